"""Command-line experiments over bnjax: ``python -m experiments.sweep``, ``python -m experiments.benchmark``."""
