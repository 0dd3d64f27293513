"""Pure transformations (no prefect, no duckdb): parsing, labels, tasks, chains, verification."""
