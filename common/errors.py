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

import atexit
import ctypes
import errno
import functools
import multiprocessing
import multiprocessing.util  # noqa: F401 -- its exit handler first, so that `_kill_leftover_workers` runs before it
import os
import re
import signal
import sys
import threading
from collections.abc import Iterable
from typing import Callable, TypeVar

Main = TypeVar("Main", bound=Callable)


class UserError(Exception):
    """Bad input or options: ``UserError(where, what)``, or ``UserError(message)`` with a message that
    already starts with where (``"<where>: <what>"``); ``where`` is then None."""

    def __init__(self, where: str | os.PathLike | None, what: str | None = None) -> None:
        if what is None:
            where, what = None, _unwrapped(str(where))
        super().__init__(what if where is None else f"{where}: {what}")
        self.where = None if where is None else str(where)
        self.what = what


def check_settings(section: str, checks: Iterable[tuple[str, object, bool, str]],
                   error: Callable[[str], UserError]) -> None:
    """Refuse the first setting whose check fails, `(field, value, ok, problem)`, as one line
    `<section>.<field>: <problem>, got <value>`: before any work, where torch or Lightning would fail later in a
    long traceback (AdamW's "Invalid learning rate"), or not at all (an EMA decay of 2 freezes the average)."""
    for field, value, ok, problem in checks:
        if not ok:
            raise error(f"{section}.{field}: {problem}, got {value!r}")


def warn(message: str, prefix: str = "") -> None:
    """A warning a user should read, on stderr as one line: `warning: <where>: <what>` (`prefix`: a job's rank,
    when there are several). Every command warns through this, so warnings look alike and can be grepped."""
    print(f"{prefix}warning: {message}", file=sys.stderr, flush=True)


_FROM_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrapped(message: str) -> str:
    """A DataLoader re-raises a worker's error as the same type with the worker's whole traceback for its message;
    the error's own line is the traceback's last (`package.SomeError: <where>: <what>`)."""
    if not _FROM_WORKER.match(message):
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EROFS,
                         errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT})
"""OSErrors a user fixes on their side (rights, the kind of thing at a path they gave, a read-only or full disk),
reported in one line when they name their path."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main process as Ctrl-C raises KeyboardInterrupt: the same clean-up runs (atomic
    writes leave only `.tmp` files) and a rerun resumes."""


def _raise_terminated(main_pid: int) -> Callable:
    def handler(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:  # a process forked before it sets its own handling (a DataLoader worker
            raise Terminated         # between fork and `leave_stop_signals_to_main`) leaves the stop to the main

    return handler


def _kill_leftover_workers() -> None:
    """At exit, before multiprocessing's own clean-up (atexit runs in reverse order of registration): that one
    stops daemonic children with SIGTERM and waits for them without a limit, which workers that ignore SIGTERM
    never answer. A DataLoader whose iterator is still alive after an error would hang the exit."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_leftover_workers)


def leave_stop_signals_to_main(worker_id: int) -> None:
    """`worker_init_fn` of every DataLoader: workers ignore SIGTERM and Ctrl-C, which a scheduler or terminal sends
    to the whole process group. The main process stops cleanly and shuts its workers down; a worker killed first
    would make torch raise "DataLoader worker is killed by signal" in the middle of that."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """Linux: exit when the process that started this worker dies, however it dies (`kill -9`, the OOM killer). A
    worker that ignores SIGTERM would otherwise live on, holding its batches and blocked on a pipe nobody reads,
    until someone kills it by hand. The kernel's parent-death signal (prctl; Python has no binding, ctypes calls
    libc's) comes when the *thread* that started the worker ends, too: a loader made in a thread that then ends must
    keep its workers, so the signal only makes the worker look whether its parent process is still there."""
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent_pid = parent.pid
    if os.getppid() != parent_pid:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)  # it died before this worker got here: nobody to work for
        return  # started by a fork server (forkserver): the kernel's parent is not the loader's process

    def exit_if_orphaned(signum: int, frame: object) -> None:
        if os.getppid() != parent_pid:
            os._exit(1)

    signal.signal(signal.SIGUSR2, exit_if_orphaned)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGUSR2)
    exit_if_orphaned(signal.SIGUSR2, None)  # it may have died before the prctl


def lightning_worker_init(worker_id: int, rank: int) -> None:
    """`worker_init_fn` of the training DataLoaders: `leave_stop_signals_to_main`, then Lightning's per-worker
    seeding when `seed_everything(workers=True)` asked for it (the CLI does). Lightning adds that seeding only to
    loaders without a `worker_init_fn`, so a loader with ours would lose it: other augmentations than before, and
    the same ones on every rank."""
    leave_stop_signals_to_main(worker_id)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        from lightning.fabric.utilities.seed import pl_worker_init_function  # here: only the trainings need Lightning

        pl_worker_init_function(worker_id, rank=rank)


def one_line(error: BaseException) -> str | None:
    """The `error:` line of a failure meant for the user: a `UserError`, or an OSError of PATH_ERRNOS naming its
    path; None for anything else, a bug, whose traceback is wanted. `exit_on` and the Lightning CLI both use it."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None and error.errno in PATH_ERRNOS:
        return f"{error.filename}: {error.strerror.lower()}"
    return None


COMMAND_PACKAGES = frozenset({"lvm", "tokenizer", "sentences"})


def _started_command() -> str | None:
    """The top package of the module this interpreter was started with by `python -m` (None for a script, `-c`,
    or an interactive session), read from the original command line: the module being imported now may be any."""
    args = getattr(sys, "orig_argv", [])[1:]
    for at, arg in enumerate(args):
        if arg.startswith("-m"):  # interpreter options come before -m; the module's own arguments after it
            module = arg[2:] or (args[at + 1] if at + 1 < len(args) else "")
            return module.split(".")[0]
        if not arg.startswith("-"):  # a script: no -m
            return None
    return None


def interrupt_quietly_when_started_as_a_command() -> None:
    """Ctrl-C in a command's first seconds, while it still imports torch and before `exit_on` wraps its `main`,
    printed a traceback of import machinery; it now says `interrupted`, as Ctrl-C anywhere later does (Python still
    exits as SIGINT does, status 130). Called by each package's `__init__`, it acts only when the program is one of
    the project's commands (`python -m lvm.x`, `python -m sentences.build`, ..., or the `lightning` script), never in
    another program that imports the packages, whose Ctrl-C tracebacks are its own."""
    if _started_command() not in COMMAND_PACKAGES and os.path.basename(sys.argv[0] if sys.argv else "") != "lightning":
        return
    shown_before = sys.excepthook

    def show(kind: type[BaseException], error: BaseException, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
        else:
            shown_before(kind, error, traceback)

    sys.excepthook = show


def exit_on(main: Main) -> Main:
    """Decorate a command's `main`: a `UserError`, or an OSError of PATH_ERRNOS naming its path, becomes one line
    `error: <message>` on stderr and exit status 2 instead of a traceback; Ctrl-C is `interrupted`, status 130
    (the shell's for SIGINT), and SIGTERM `terminated`, status 143, instead of a silent death."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = signal.signal(signal.SIGTERM, _raise_terminated(os.getpid())) if in_main_thread else None
        try:
            return main(*args, **kwargs)
        except Terminated:
            print("terminated", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        except (UserError, OSError) as error:
            message = one_line(error)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a bug: no traceback (the resumable jobs resume)
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return run  # type: ignore[return-value]
