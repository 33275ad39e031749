"""Curves between two networks: the curve model, its fitting and its evaluation."""
