"""The db capability."""
