"""Tooling beside the method: bench.py (this project against TRL) and assets.py (models and data it shares with the
tests). The project's scripts never import it."""
