"""Ensembles: FGE and SSE (one snapshot driver), ensemble evaluation, the budget comparison."""
