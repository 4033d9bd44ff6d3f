"""The runbook as Prefect flows: daily data jobs, maintenance; thin layers over crypto_agent."""
