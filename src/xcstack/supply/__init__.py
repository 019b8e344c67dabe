"""The supply capability."""
