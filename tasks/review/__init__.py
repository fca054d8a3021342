"""Human review of candidate lists: decisions, marks pulled from the MLflow UI, the Prefect form."""
