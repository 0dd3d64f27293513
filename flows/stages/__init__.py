"""Pipeline stages. Each module exposes the same small protocol (see common.Stage)."""
