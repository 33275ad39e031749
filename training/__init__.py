"""Training stage: data, training loops, curves, FGE, evaluation, export, CLI."""
