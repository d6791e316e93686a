"""The one base class of errors meant for users, and `exit_on`, which prints them as one line.

An error a user can fix (a bad option, an unreadable or inconsistent file) is raised as a subclass of
`UserError`. It carries where the problem is (a file, an option, a config field) and what it is; its
message is `<where>: <what>` on one line. Every `python -m` command wraps its `main` in `exit_on`, and the
`lightning` CLI (`lvm.cli`) catches the same base class, so users see `error: <where>: <what>` and exit
status 2 instead of a traceback. So does an OSError about a path the user controls (permission denied, a
folder where a file belongs, a file where a folder belongs): `error: <path>: <what the OS says>`. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable, TypeVar

Main = TypeVar("Main", bound=Callable)


class UserError(Exception):
    """Bad input or options: ``UserError(where, what)``, or ``UserError(message)`` with a message that
    already starts with where (``"<where>: <what>"``); ``where`` is then None."""

    def __init__(self, where: str | os.PathLike | None, what: str | None = None) -> None:
        if what is None:
            where, what = None, str(where)
        super().__init__(what if where is None else f"{where}: {what}")
        self.where = None if where is None else str(where)
        self.what = what


PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EROFS,
                         errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT})
"""OSErrors a user fixes on their side (rights, the kind of thing at a path they gave, a read-only or full disk),
reported in one line when they name their path."""


def exit_on(main: Main) -> Main:
    """Decorate a command's `main`: a `UserError`, or an OSError of PATH_ERRNOS naming its path, becomes one line
    `error: <message>` on stderr and exit status 2 instead of a traceback; Ctrl-C is `interrupted`, status 130
    (the shell's for SIGINT)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as error:
            if error.filename is None or error.errno not in PATH_ERRNOS:
                raise
            print(f"error: {error.filename}: {error.strerror.lower()}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a bug: no traceback (the resumable jobs resume)
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return run  # type: ignore[return-value]
