"""The `lightning` console script: Lightning's own CLI over this project's modules.

`lightning fit -c configs/lvm_tiny.yaml` trains whatever `model:` and `data:`
name by `class_path`, so the VQGAN and the LVM share one entry point. Errors the
project raises for bad settings or bad data (`common.errors.UserError`) are printed
as one line, not a traceback, and so is a config asking for GPUs this machine does not
have (checked before Lightning builds its Trainer).
"""

import logging
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import weights
from common.errors import UserError, one_line
from common.files import natural_key
from common.options import SEEDS
from lvm.callbacks import StopOnSignal
from lvm.errors import ConfigError

# Lines of a run's log that say nothing about it: Lightning's advert for its cloud logger, a deprecation inside
# Lightning's own pytree helper under this torch (Lightning's to change, not the user's), and, where a config names no
# logger (the VQGAN configs: logs under trainer.default_root_dir), five lines on why the default is CSV, not TensorBoard.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")

_REFUSED_RUN_FILES = frozenset({"config.yaml", "hparams.yaml"})
"""What a run refused before its first step leaves in its logger folder: LightningCLI's copy of the config, and the
hyperparameters a logger writes as it closes."""


def requested_devices(devices: object) -> int | None:
    """GPUs a `trainer.devices` value asks for: 8, [0, 1], "0,1", "2"; None for "auto" / -1 (any number)."""
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([part for part in devices.split(",") if part.strip()])
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices) or None
    return None


def check_accelerator(config: Namespace) -> None:
    """A config asking for more GPUs than this machine has: one line saying both, instead of Lightning's
    30-line `MisconfigurationException` traceback from deep inside the Trainer."""
    trainer = config.trainer
    accelerator = trainer.accelerator if isinstance(trainer.accelerator, str) else None
    if accelerator not in ("gpu", "cuda"):
        return
    wanted, found = requested_devices(trainer.devices), torch.cuda.device_count()
    if found >= (wanted or 1):
        return
    source = " + ".join(str(path) for path in config.get("config") or []) or "this run"
    gpus = f"{wanted} GPU{'s' * (wanted != 1)}" if wanted else "GPUs"
    if found == 0:
        advice = ("on a CPU use a tiny config (configs/lvm_tiny.yaml, configs/vqgan_tiny.yaml); a paper size on CPUs holds "
                  "a float32 copy of the model per device (--trainer.accelerator cpu --trainer.devices 1 "
                  "--trainer.precision 32-true, and the memory for it)")
        have = "none"
    else:
        advice = f"override --trainer.devices {found}"
        have = f"only {found}"
    raise ConfigError(f"{source} trains on {gpus} (accelerator {accelerator}) and this machine has {have}; {advice}")


def check_val_interval(interval: object) -> None:
    """`val_check_interval 0` passes Lightning's checks and divides by zero after the first step, leaving a checkpoint
    that refuses the corrected rerun."""
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval <= 0:
        raise ConfigError(f"trainer.val_check_interval: must be > 0 (a number of batches), got {interval}")


def _checkpointers(config: Namespace) -> list[dict]:
    """The init_args of the config's ModelCheckpoint callbacks."""
    callbacks = config.trainer.get("callbacks") or []
    return [dict(callback.get("init_args") or {}) for callback in (callbacks if isinstance(callbacks, list) else [callbacks])
            if isinstance(callback, Namespace) and str(callback.get("class_path", "")).endswith("ModelCheckpoint")]


def check_start(config: Namespace, subcommand: str = "fit") -> None:
    """Where a fit starts must be the run's own checkpoint, never a silent step 0 over an earlier run; what a
    validate reads must be a checkpoint, never the fresh random weights Lightning falls back to.

    Without --ckpt_path it starts at step 0. Into a checkpoint folder of an earlier run (our configs name a fixed
    one, with no version counter, so that resumes keep one `last.ckpt`), it would overwrite that run's checkpoints
    of the same steps and move `last.ckpt` to itself: a rerun of the first command after a preemption would lose the
    run it meant to continue. `--ckpt_path last` with checkpoints but no `last.ckpt` (a copy that drops links, a kill
    while Lightning relinked it) did the same: Lightning only warns and starts at step 0. `best` needs a monitor.
    A `.ckpt.tmp` left by a kill during a save is removed: no writer runs before training starts, and a stop's
    checkpoint is named after a step that never comes again, so nothing would overwrite it."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is not None and not str(ckpt_path).strip():  # `--ckpt_path "$CKPT"` with the variable unset
        raise ConfigError("--ckpt_path: empty; give 'last' or a .ckpt file" +
                          (", or leave it out to start anew" if subcommand == "fit" else ""))
    if subcommand == "validate" and ckpt_path is None:
        raise ConfigError("lightning validate: give --ckpt_path ('last' or a .ckpt file); without one it validates "
                          "the model's fresh random weights")
    root = Path(config.trainer.get("default_root_dir") or ".")
    if ckpt_path == "hpc" and not any(root.glob("hpc_ckpt_*.ckpt")):  # what Lightning's SLURM requeue (SIGUSR1) saves
        raise ConfigError(f"--ckpt_path hpc: {root} holds no hpc_ckpt_*.ckpt (Lightning saves one when SLURM sends "
                          "SIGUSR1 before requeueing); give 'last' or a .ckpt file")
    held, lasts = [], []  # (folder, its checkpoints in natural order, keeps a last); the `last` ones Lightning takes
    for args in _checkpointers(config):
        folder = Path(args["dirpath"]) if args.get("dirpath") else None
        if folder is None:
            continue
        if subcommand == "fit":  # a validate may run beside a fit that is writing one
            for partial in folder.glob("*.ckpt.tmp"):
                partial.unlink(missing_ok=True)
        checkpoints = sorted(folder.glob("*.ckpt"), key=natural_key)  # step=00000150.ckpt: the newest last
        lasts += [path for path in checkpoints if path.stem.startswith("last") and path.exists()]  # Lightning's match
        if checkpoints:
            held.append((folder, checkpoints, bool(args.get("save_last"))))
    if subcommand == "validate" and ckpt_path == "last" and not lasts:  # Lightning validated the fresh weights, exit 0
        folders = [str(args["dirpath"]) for args in _checkpointers(config) if args.get("dirpath")]
        raise ConfigError(f"--ckpt_path last: no last*.ckpt in {' or '.join(folders) or 'a checkpoint folder'}; "
                          "give a .ckpt file")
    if held and not ckpt_path and subcommand == "fit":
        raise ConfigError(f"{held[0][0]} holds the checkpoints of an earlier run, which a fresh start would overwrite "
                          "(last.ckpt included): continue it with --ckpt_path last, or start anew in another folder "
                          "(move this one away, or change the run's paths)")
    if held and ckpt_path == "last" and not lasts and subcommand == "fit":  # Lightning's rule: a last*.ckpt anywhere
        folder, checkpoints, _ = next((entry for entry in held if entry[2]), held[0])  # the folder that keeps a last
        newest = [path for path in checkpoints if not path.name.startswith("last")] or checkpoints
        raise ConfigError(f"--ckpt_path last: {folder} holds checkpoints but no last.ckpt (a copy that dropped "
                          f"links, or a kill while it was moved on), and Lightning would start at step 0 over them: "
                          f"continue from the newest, --ckpt_path {newest[-1]}")
    if ckpt_path == "best" and not any(args.get("monitor") for args in _checkpointers(config)):
        raise ConfigError("--ckpt_path best: no ModelCheckpoint of this config has a monitor, so none is best; give "
                          "'last' or a .ckpt file")


def concise(message: str) -> str:
    """jsonargparse's nested report of a bad config value (a Union of subtypes, each with its own errors, the value's
    type and repr) as the one reason that matters: `model.lr: expected a float, got abc`, `model.grad_clip: expected a
    float or null, got abc`, `model.lrr: not an option of lvm.train.LVMModule`, `model: no class lvm.train.LVMModul`.
    It reads the innermost key's report (the first alternative's: the class given); anything else is kept as it is."""
    lines = message.splitlines()
    keyed = [i for i, line in enumerate(lines) if re.search(r'Parser key "[^"]+"', line)]
    if not keyed:
        return message
    keys = [re.search(r'Parser key "([^"]+)"', lines[i])[1] for i in keyed]
    where, last = ".".join(keys), keyed[-1]
    indent = len(lines[last]) - len(lines[last].lstrip())
    block = [lines[last]]  # the innermost key's report: the lines indented below it
    for line in lines[last + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line.strip())
    report = "\n".join(block)
    owner = re.search(r"Problem with given class_path '([^']+)'", report)
    if option := re.search(r"Option '([^']+)' is not accepted", report):
        return f"{where}.{option[1]}: not an option of {owner[1]}" if owner else f"{where}.{option[1]}: not an option"
    if owner and (missing := re.search(r"has no attribute '[^']+'", report)):
        return f"{where}: no class {owner[1]} ({missing[0]})"
    reasons = [line[2:] for line in block if line.startswith("- ") and not line.startswith(("- Expected a", "- Does not"))
               and "Problem with given class_path" not in line]
    if reasons:  # a reason of its own ("Multiple subclasses with name ...: give the full class path")
        return f"{where}: {reasons[0]}"
    # A Union first: its report also holds one "Expected a" line per subtype, with the value as YAML read it
    # (`--seed_everything 1e3` said "expected a bool, got 1000.0").
    if (subtypes := re.search(r"Subtypes: \[(.*)\]", report)) and (given := re.search(r"Given value: (.*)", report)):
        wanted, value = " or ".join(_type_names(t) for t in _top_level(subtypes[1])), given[1]
    elif expected := re.search(r"Expected a (.+)\. Got value: (.*)", report):
        wanted, value = _type_names(expected[1]), expected[2]
    elif single := re.fullmatch(r'Parser key "([^"]+)": ([^\n]*)', message):
        return f"{single[1]}: {single[2]}"
    else:
        return message
    article = "" if wanted.startswith("one of") else "an " if wanted[0] in "aeiou" else "a "
    return f"{where}: expected {article}{wanted}, got {value}"


def _top_level(text: str) -> list[str]:
    """The items of a printed list, split at the commas outside brackets: `dict[str, Any], <class 'int'>`."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items, current = [*items, current.strip()], ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


def _type_names(text: str) -> str:
    """`<class 'int'>` -> int, `<class 'NoneType'>` -> null, `dict[str, typing.Any]` -> dict,
    `typing.Literal['a', 'b']` -> one of 'a', 'b'."""
    if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", text.strip()):
        return f"one of {literal[1]}"
    text = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text).replace("NoneType", "null")
    return re.sub(r"\[.*\]$", "", text.strip()).rsplit(".", 1)[-1]


class ConciseParser(LightningArgumentParser):
    """Config errors in one line: jsonargparse printed the 47-line usage and a dump of its type checks around the one
    reason (`Option 'lrr' is not accepted`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        print(f"error: {concise(message)} (`{prog} --help` lists the options)", file=sys.stderr)
        self.exit(2)


class SeedCheckedCLI(LightningCLI):
    """LightningCLI whose `seed_everything` is range-checked: a seed past numpy's (2**32) was a ValueError traceback."""

    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < SEEDS:
            raise ConfigError(f"seed_everything: {seed} is not in [0, 2**32) (the seeds numpy and Lightning take)")
        super()._set_seed()


class CLI(SeedCheckedCLI):
    """The training CLI: checks the machine can run the config before building the Trainer."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator(config)
        check_val_interval(config.trainer.val_check_interval)
        if self.subcommand in ("fit", "validate"):
            check_start(config, self.subcommand)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's Trainer, whose refusals of a trainer value (`max_steps -5`, `devices abc`, `num_nodes 0`, a
        strategy or accelerator it lacks) are one line here: they were 30-line tracebacks."""
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as error:
            raise ConfigError(f"trainer: {str(error).strip().splitlines()[0]}") from None

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's run, which makes each logger's `version_N` folder before the model and data check their
        settings: a run refused there, before its first step, leaves no folder holding only its config (the next run
        would be version_N+1 beside an empty one). A folder that held anything before this run stays."""
        fresh = [Path(logger.log_dir) for logger in self.trainer.loggers
                 if getattr(logger, "log_dir", None) and not Path(logger.log_dir).exists()]
        try:
            super()._run_subcommand(subcommand)
        except Exception as exc:
            if user_error(exc) is not None and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                for folder in fresh:
                    if folder.is_dir() and {path.name for path in folder.iterdir()} <= _REFUSED_RUN_FILES:
                        shutil.rmtree(folder)
            raise

    def _parse_ckpt_path(self) -> None:
        """Lightning's step that reads the model's hyperparameters from `--ckpt_path` into the config, replaced: the
        command line and config win, as they do with `--ckpt_path last` (Lightning's step gave a named checkpoint's
        settings precedence, so the NaN stop's advice, a lower model.lr or on_nonfinite_loss=skip, did nothing).
        A model of another shape is refused when the checkpoint is loaded (`LVMModule.on_load_checkpoint`). Here,
        with the checkpoint memory-mapped (Lightning read all of it, on every rank: 39 GB of host memory each at
        3b): a folder, a corrupt file or the checkpoint of another kind of model is one line naming it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if Path(ckpt_path).is_dir():
            if (Path(ckpt_path) / ".metadata").is_file():
                return  # a sharded checkpoint (save_distributed_checkpoint): Lightning reads it, with no hyperparameters
            raise ConfigError(f"--ckpt_path: {ckpt_path} is a folder but no sharded checkpoint; give a .ckpt file (or 'last')")
        if not Path(ckpt_path).is_file():
            return  # Lightning says so, in one line (AtomicCheckpointIO)
        checkpoint = weights.torch_load(ckpt_path, mmap=True)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(hparams, dict | None):
            raise ConfigError(f"--ckpt_path: {ckpt_path} is no Lightning checkpoint (no hyper_parameters mapping)")
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ConfigError(f"--ckpt_path: {ckpt_path} is no Lightning checkpoint (no state_dict)")
        hparams = dict(hparams or {})
        hparams.pop("_instantiator", None)
        saved_class = hparams.pop("_class_path", None)
        wanted = self.config[subcommand].get("model")
        wanted_class = wanted.get("class_path") if isinstance(wanted, Namespace) else None
        if saved_class and wanted_class and saved_class != wanted_class:
            raise ConfigError(f"--ckpt_path: {ckpt_path} was saved by {saved_class}; this config trains {wanted_class}")


def user_error(exc: BaseException) -> str | None:
    """The `error:` line of the failure behind `exc`, if it is meant for the user (`common.errors.one_line`): the
    project error, however deep jsonargparse wrapped it (it re-raises errors from a class's __init__ as its own
    ValueError, with ours as the cause), or a path OSError raised as it is (a logger folder under a file, a full
    disk while a checkpoint is written). So is Lightning's own word for a bad setting, `MisconfigurationException`,
    wherever it comes from (a callback's `every_n_train_steps -5`, a `val_check_interval` fraction over the LVM's
    stream, which has no length): its first line."""
    message = one_line(exc)
    if message is not None:
        return message
    while exc is not None:
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, MisconfigurationException):
            return str(exc).strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def config_errors_as_one_line() -> Iterator[None]:
    """A project error raised while a config is parsed or built, or a path error while it runs, becomes one
    `error:` line and exit status 2, as `common.errors.exit_on` does for the `python -m` commands."""
    try:
        yield
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Run LightningCLI with fit/validate/test/predict subcommands. A run stopped by a signal (`StopOnSignal`)
    exits with 128 + its number, as a process killed by it would: `lightning fit ... && next` does not go on with
    an unfinished model, and a scheduler sees that the job did not finish. Ctrl-C outside that (before training
    starts, or a second one) is `interrupted` and 130, as in the `python -m` commands (`common.errors.exit_on`):
    Lightning would exit 1, a failure, or print a traceback."""
    try:
        with config_errors_as_one_line():
            CLI(
                parser_class=ConciseParser,
                subclass_mode_model=True,
                subclass_mode_data=True,
                auto_configure_optimizers=False,  # LVMModule builds its optimizer groups and schedule itself
                save_config_kwargs={"overwrite": True},
                args=args,
                # the console script, or `python -m lvm.cli` under torchrun/srun: never "cli.py", not runnable
                parser_kwargs={"prog": "lightning" if Path(sys.argv[0]).stem == "lightning" else "python -m lvm.cli"},
            )
    except SIGTERMException:
        signum = StopOnSignal.received or signal.SIGTERM
        if getattr(rank_zero_only, "rank", 0) == 0:  # once per run, not once per rank (32 times on 4 nodes)
            print(f"stopped by {signal.Signals(signum).name} with a checkpoint; continue with the same command and "
                  "--ckpt_path last", file=sys.stderr)
        sys.exit(128 + signum)
    except KeyboardInterrupt:  # before Lightning's trainer runs: building the model, reading a checkpoint
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as stop:
        if stop.code != 1 or not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        # Lightning's own handling of a Ctrl-C it caught (`sys.exit(1)` after saving what it has)
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
