"""xcstack: AI service gateway for 信创 infrastructure."""

__version__ = "0.1.0"
