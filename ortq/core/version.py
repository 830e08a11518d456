"""The package version, in one place: the root re-exports it and records (such as preprocess's) cite it."""

__version__ = "0.1.0"
