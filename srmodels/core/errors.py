"""The one exception family for problems a user can cause and fix.

Every error raised for a bad input file, a params key or a checkpoint derives from ``UserError`` and its message
names the file or the key and the problem. Stage scripts and the CLI print such an error as one line and exit
non-zero; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's files or settings; the message names the file or params key."""


class DataError(UserError):
    """Input data that does not fit what a stage needs (sizes, truncated caches, missing splits)."""
