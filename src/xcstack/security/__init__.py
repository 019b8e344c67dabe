"""The security capability."""
