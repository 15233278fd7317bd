"""Compatibility package: the import paths of our older code."""
