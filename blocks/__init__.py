"""Prefect Block types of the project (escalation) and their registration."""
