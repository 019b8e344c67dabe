"""The web console at /console: server-rendered pages for the three administrators and API users."""
