"""Experiment scripts: thin absl mains over plateau_jax (run as ``python -m experiments.<name>``)."""
