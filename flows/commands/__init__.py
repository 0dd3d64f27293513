"""CLI command groups. Each module defines ``register(app)``; flows.cli calls them all."""
