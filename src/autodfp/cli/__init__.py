"""The ``autodfp`` command line: parses flags, builds the config, calls the API, renders output."""

from autodfp.cli.app import app, main

__all__ = ["app", "main"]
