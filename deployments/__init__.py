"""What prefect.yaml cannot say alone: the Prefect-side CLI commands (blocks-register, deploy)."""
