"""Prefect flows and tasks that wire schemas, extractors, warehouse and training together; the CLI."""
