"""Exceptions of the training stack (`lvm.train`, `lvm.data`, `lvm.callbacks`).

Each message is one line that starts with what is wrong, so the `lightning` CLI can print it as
`error: <config>: <message>` instead of a traceback.
"""


class ConfigError(ValueError):
    """An invalid training setting, raised before any data is read; the message starts with the
    config field (`model.lr: must be > 0, got -1.0`)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the optimizer step and the batch."""
