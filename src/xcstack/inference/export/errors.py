"""The one error of model export: a checkpoint that cannot be imported, with a message saying why.

Its own module so the graph, quantisation and repository steps all raise it without importing each other.
"""

from __future__ import annotations


class ModelImportError(Exception):
    """The source checkpoint cannot be imported (message says why); the CLI prints it and exits 1."""
