"""Confusion-matrix metrics, evaluators and multi-scale inference."""
