"""The exceptions edm-fast raises for its user, so that callers can tell them apart from bugs: the
CLI prints the message of any ``EdmFastError`` as one line and exits with its ``exit_code``,
without knowing its type.

    EdmFastError          base class (a ValueError: bad input; exit code 2)
      BadFileError        a file edm-fast refuses to read: malformed, hostile, or costing far
                          more memory, time or disk than its size warrants; the message names
                          the file and what is wrong

An error type of a module subclasses ``EdmFastError`` (beside the builtin kind it is, as in
``class NotADenoiserError(EdmFastError, TypeError)``) when a user can act on its message. An
error that is not a bad input (a missing optional package: an ImportError; NaN/Inf from a model:
a FloatingPointError; a diverged training run) stays its own kind and sets ``exit_code`` (1 for
a run that failed on valid input): the CLI reports any exception that carries one.
"""

from __future__ import annotations

__all__ = ["EdmFastError", "BadFileError"]


class EdmFastError(ValueError):
    """Base class of edm-fast's errors for its user (options, models, files, failed runs)."""

    exit_code = 2  # what the CLI exits with: 2 for bad input, 1 for a run that failed


class BadFileError(EdmFastError):
    """A file that edm-fast refuses to load; ``str(exc)`` is one line naming the file."""
