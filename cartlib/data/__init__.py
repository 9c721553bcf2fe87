"""Datasets: the built-in synthetic benchmark, real datasets from local files, their schema."""
