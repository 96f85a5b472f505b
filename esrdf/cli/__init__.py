"""Command-line entry points (``esrdf-train``, ``esrdf-eval``). Import-light: commands import their needs."""
