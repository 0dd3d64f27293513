"""Dataset builders, rewards, RadRScore, SFT/GRPO jobs and evaluation (no prefect, no duckdb)."""
