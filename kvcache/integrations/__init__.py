"""Adapters for inference frameworks (optional extras; ``import kvcache`` never imports them)."""
