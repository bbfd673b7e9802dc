"""Runnable examples; importable so the tests can reuse the synthetic data and models."""
