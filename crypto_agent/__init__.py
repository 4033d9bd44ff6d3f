"""crypto_agent: the 24/7 backtesting infrastructure that the runbook operates (no Prefect here)."""

__version__ = "0.1.0"
