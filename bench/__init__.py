"""Benchmarks of the relay against the echo upstream (``uv run python -m bench``)."""
