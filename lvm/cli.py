"""The `lightning` console script: Lightning's own CLI over this project's modules.

`lightning fit -c configs/lvm_tiny.yaml` trains whatever `model:` and `data:`
name by `class_path`, so the VQGAN and the LVM share one entry point.
"""

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> None:
    """Run LightningCLI with fit/validate/test/predict subcommands."""
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
