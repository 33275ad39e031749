"""Simplexes of low loss between networks (Benton et al., ICML 2021): the model, its fitting, its evaluation."""
