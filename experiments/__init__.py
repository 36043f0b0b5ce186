"""The experiments of ``docs/reproduction.md``: ``python -m experiments.NAME`` from the repository root."""
