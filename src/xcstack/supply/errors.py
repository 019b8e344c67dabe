"""Errors of the supply capability (command-line only: they never cross the HTTP boundary)."""

from __future__ import annotations


class SupplyError(Exception):
    """Base class; the message is for the operator."""


class SbomValidationError(SupplyError):
    """The generated document does not validate against its schema (nothing was written)."""


class AdvisoryError(SupplyError):
    """The offline advisory export cannot be read."""
