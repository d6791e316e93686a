"""Exceptions of the training stack (`lvm.train`, `lvm.data`, `lvm.callbacks`), and `exit_on`, which
turns the errors a command expects into its one-line `error:` message.

Each message is one line that starts with what is wrong, so the `lightning` CLI can print it as
`error: <config>: <message>` instead of a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

Main = TypeVar("Main", bound=Callable)


class ConfigError(ValueError):
    """An invalid training setting, raised before any data is read; the message starts with the
    config field (`model.lr: must be > 0, got -1.0`)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the optimizer step and the batch."""


def exit_on(*errors: type[Exception]) -> Callable[[Main], Main]:
    """Decorate a command's `main`: bad input or options, raised as one of `errors`, become one line
    `error: <message>` on stderr and exit status 2 instead of a traceback. Every `python -m` command of
    `lvm` and `sentences` uses it; `lightning` has its own (`lvm.cli`), because jsonargparse wraps errors.
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except errors as error:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(2) from None

        return run  # type: ignore[return-value]

    return decorate
