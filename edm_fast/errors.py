"""The exceptions edm-fast raises for a user's input, so that callers can tell them apart from
bugs: the CLI prints their message as one line and exits with code 2.

    EdmFastError          base class (a ValueError: bad input)
      BadFileError        a file edm-fast refuses to read: malformed, hostile, or costing far
                          more memory, time or disk than its size warrants; the message names
                          the file and what is wrong
"""

from __future__ import annotations

__all__ = ["EdmFastError", "BadFileError"]


class EdmFastError(ValueError):
    """Base class of edm-fast's errors about its input (options, models, files)."""


class BadFileError(EdmFastError):
    """A file that edm-fast refuses to load; ``str(exc)`` is one line naming the file."""
