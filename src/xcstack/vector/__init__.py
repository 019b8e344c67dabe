"""The vector capability."""
