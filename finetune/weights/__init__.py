"""Weights: the weight sources table, reading tensors (files, runs, recipes, the Hub), loading
them by name and shape, and the load report."""
