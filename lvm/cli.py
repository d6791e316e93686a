"""The `lightning` console script: Lightning's own CLI over this project's modules.

`lightning fit -c configs/lvm_tiny.yaml` trains whatever `model:` and `data:`
name by `class_path`, so the VQGAN and the LVM share one entry point. Errors the
project raises for bad settings or bad data (`common.errors.UserError`) are printed
as one line, not a traceback.
"""

import sys

from lightning.pytorch.cli import LightningCLI

from common.errors import UserError


def user_error(exc: BaseException) -> UserError | None:
    """The project error behind `exc`, if any: jsonargparse re-raises errors from a class's
    __init__ as its own ValueError, with ours as the cause."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Run LightningCLI with fit/validate/test/predict subcommands."""
    try:
        LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
