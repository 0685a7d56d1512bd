"""Interpolation science: paths, prompt pairs, interpolation runs and their metrics."""
