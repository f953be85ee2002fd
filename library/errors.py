"""User errors: problems the user can fix (an option, a file, a dataset, a disk), reported as one line.

Every wing's user-facing exception subclasses `UserError`, so the scripts' one `except` needs no list
of classes. Operating-system errors about a path the user chose (missing, not writable, a file where a
folder should be, a full disk) are user errors too: `user_message` turns them into the same one-line
form, `<path>: <what is wrong>; <what to do>`. Anything else is a bug and keeps its traceback.
`print_user_error` is the one printer every script uses; user errors exit with `USER_ERROR_EXIT`.
"""

from __future__ import annotations

import errno
import sys
from typing import TextIO

USER_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


class UserError(Exception):
    """Base of every error whose message tells the user what to fix."""


# errno -> what to do about it; the OS's own text (strerror) says what happened.
_OS_ERROR_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "this user may not write or read there: fix the folder's permissions or choose another path",
    errno.EPERM: "the operation is not permitted there: fix the permissions or choose another path",
    errno.EROFS: "that filesystem is read-only: choose a path on a writable disk",
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or choose a folder on another disk",
    errno.EEXIST: "a file is in the way: remove or rename it, or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "that is a folder, not a file: give the file's path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ENOTEMPTY: "the folder is not empty: remove its contents or choose another path",
}


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, UserError):
        return True
    return isinstance(err, OSError) and (isinstance(err, FileNotFoundError) or err.errno in _OS_ERROR_FIXES)


def describe_os_error(err: OSError, with_path: bool = True) -> str:
    """`<path>: <OS text>; <fix>` for an OS error about a path (without the path when the caller names it)."""
    where = err.filename if err.filename is not None and with_path else ""
    text = err.strerror or str(err)
    fix = _OS_ERROR_FIXES.get(err.errno or 0)
    message = f"{where}: {text}" if where else text
    if err.filename2 is not None and with_path:
        message += f" (-> {err.filename2})"
    return f"{message}; {fix}" if fix else message


def user_message(err: BaseException) -> str:
    """The one line shown for a user error (without the `error:` prefix)."""
    if isinstance(err, OSError) and not isinstance(err, UserError):
        if isinstance(err, FileNotFoundError) and err.filename is None:
            return str(err)  # our own FileNotFoundError("... not found: path") already reads well
        return describe_os_error(err)
    return str(err)


def print_user_error(err: BaseException | str, stream: TextIO | None = None) -> int:
    """Print `error: <message>` (continuation lines indented) and return the exit code for user errors."""
    message = err if isinstance(err, str) else user_message(err)
    lines = message.strip().splitlines() or [""]
    out = stream or sys.stderr
    print(f"error: {lines[0]}", file=out)
    for line in lines[1:]:
        print(f"  {line.strip()}" if not line.startswith("  ") else line, file=out)
    return USER_ERROR_EXIT
