"""The package version, importable without initialising anything else."""

__version__ = "0.1.0"
