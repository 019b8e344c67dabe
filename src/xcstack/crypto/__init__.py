"""The crypto capability."""
