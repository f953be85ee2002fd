"""User errors: problems the user can fix (an option, a file, a dataset), reported as one line without a traceback.

Every wing's user-facing exception subclasses `UserError`, so the scripts' one `except` needs no list
of classes. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to fix."""


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, (UserError, FileNotFoundError))
