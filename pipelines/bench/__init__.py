"""Benchmarks measured as ratios against a baseline in the same run (`v05 bench estimator`, `v05 bench store`)."""
