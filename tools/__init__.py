"""Maintenance scripts (examples, screenshots); not part of the product's import path."""
