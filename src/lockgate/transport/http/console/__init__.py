"""The governance console (``/console`` on the HTTP port); see ``app.Console``."""

from lockgate.transport.http.console.app import Console

__all__ = ["Console"]
