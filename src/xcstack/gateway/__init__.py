"""The gateway capability."""
