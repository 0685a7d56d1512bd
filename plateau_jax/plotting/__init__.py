"""Every figure the package draws."""
