"""Reasoning-chain mining: rule backend, LLM backend, verification."""
