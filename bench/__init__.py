"""Benchmarks of nostalgia_jax (see bench/README.md)."""
