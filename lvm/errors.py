"""Errors of the training stack (`lvm.train`, `lvm.data`, `lvm.callbacks`).

Both are `common.errors.UserError`s, so the `lightning` CLI prints them as `error: <message>` instead of a
traceback.
"""

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid training setting, raised before any data is read; the message starts with the
    config field (`model.lr: must be > 0, got -1.0`)."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or Inf; the message names the optimizer step and the batch."""
