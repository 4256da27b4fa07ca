"""The package version (one place: pyproject.toml reads it, `dept --version` prints it)."""

__version__ = "0.3.0"
