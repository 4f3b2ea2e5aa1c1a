"""Errors in what a user gave promptkd's trainer and command line, told apart from internal faults.

``InputError`` (a ``ValueError``) and ``InputTypeError`` (also a ``TypeError``) mark a bad config
key, data file, path, run directory or command-line argument. ``promptkd`` prints their message
on one line and exits with status 2; any other exception is a fault and keeps its traceback
(exit status 1). Library callers can keep catching ``ValueError`` / ``TypeError``.
``TrainingDiverged`` ends a run whose numbers stopped being finite (exit status 3).
"""

from __future__ import annotations


class InputError(ValueError):
    """A value the user supplied is wrong (the message names it)."""


class InputTypeError(InputError, TypeError):
    """A value the user supplied has the wrong type (the message names it)."""


class TrainingDiverged(RuntimeError):
    """A loss, a gradient or the weights became NaN or infinite; the run stopped without applying that
    step or saving those weights (every checkpoint it wrote holds finite weights)."""
