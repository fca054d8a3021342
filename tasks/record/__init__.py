"""Recording audits: the MLflow boundary, the manifest and run of each audit, traces for review, sync."""
