"""The inference capability."""
