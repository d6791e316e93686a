"""LVM training: the tiny config learns, SIGTERM + `--ckpt_path last` resumes the same loss curve, DDP on
2 CPU processes, NaN handling, config errors before any data is read, FSDP-style init, the 3B dry run.

Models are tiny and single-threaded: on a shared 2-core machine, extra threads only contend.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.cli import LightningCLI

from common.errors import UserError
from common.vocab import BOS_ID, CODEBOOK_SIZE, EOS_ID
from lvm import cli as lvm_cli
from lvm import train
from lvm.callbacks import AtomicCheckpointIO, SampleImages, TokenThroughput
from lvm.data import LVMDataModule
from lvm.errors import ConfigError, NonFiniteLossError
from lvm.model import LVM, Linear, LVMConfig
from lvm.train import LVMModule, lr_multiplier
from sentences.stream import PackedStream
from test_data import write_sentence_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lvm_tiny.yaml")
MINI = dict(dim=32, mlp_dim=64, n_layers=2, n_heads=2, max_seq_len=64)  # a test-sized "tiny"
# The tiny config with test-sized model and batches (1 optimizer step = 2 rows of 32 tokens).
FAST = ["--model.overrides", str(MINI), "--model.lr", "3e-3", "--model.warmup_steps", "10",
        "--data.seq_len", "32", "--data.batch_size", "2", "--trainer.log_every_n_steps", "1"]


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch):
    """In-process CLIs get their arguments from `args`; pytest's own must not look like extra ones."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_sentence_shards(tmp_path_factory.mktemp("sentences"))


def tiny_cli(shards: Path, *args: str) -> LightningCLI:
    """configs/lvm_tiny.yaml parsed and instantiated as `lightning fit` does, without running."""
    return LightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["-c", TINY, "--data.train_shards", str(shards), *FAST, *args],
    )


def logged(run_dir: Path, version: int = 0, key: str = "train/loss") -> dict[int, float]:
    """{step: value} from one CSV log of a run directory (each fit, resumed or not, writes a new version)."""
    rows = csv.DictReader((run_dir / f"runs/lvm_tiny/logs/version_{version}/metrics.csv").open())
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def enter(run_dir: Path, monkeypatch) -> None:
    """Work in a fresh directory: the config writes everything under runs/lvm_tiny/ there."""
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)


@contextmanager
def expect_stop() -> Iterator[pytest.ExceptionInfo[SystemExit]]:
    """The run inside must stop (SystemExit); Ctrl-C works again afterwards (Lightning ignores it after a
    KeyboardInterrupt, which would leave the rest of the session deaf to it)."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            yield exit_info
    finally:
        signal.signal(signal.SIGINT, sigint)


class SignalAt(L.Callback):
    """Sends this process `signum` (`times` times) after optimizer step `step`: SIGTERM as a scheduler preempting the
    job would, SIGINT as Ctrl-C in a terminal."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def test_tiny_config_learns_and_resumes_the_same_loss_curve_after_sigterm(shards, tmp_path, monkeypatch):
    # Uninterrupted reference: 200 steps (the stream's epoch ends after 122, so the run crosses it).
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "200")
    cli.trainer.fit(cli.model, cli.datamodule)
    reference = logged(tmp_path / "a")
    assert sorted(reference) == list(range(200))
    first, last = sum(reference[s] for s in range(10)) / 10, sum(reference[s] for s in range(190, 200)) / 10
    assert first > 8.0 and last < 2.5, (first, last)  # ln(8292) = 9.0 at init
    for key in ("train/grad_norm", "train/ppl", "train/device/items_per_sec", "lr-AdamW/pg1"):  # tokens/s, lr, grad norm
        assert logged(tmp_path / "a", key=key), key

    # Same run, preempted: SIGTERM after step 70 stops it after that step with a checkpoint ...
    enter(tmp_path / "b", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "200")
    cli.trainer.callbacks.append(SignalAt(70))
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, cli.datamodule)
    stopped = cli.trainer.global_step
    assert 70 <= stopped < 200
    assert torch.load(tmp_path / "b/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == stopped
    assert logged(tmp_path / "b", version=0) == pytest.approx({s: reference[s] for s in range(stopped)}, rel=1e-5, abs=1e-6)

    # ... and `--ckpt_path last` continues with exactly the losses of the uninterrupted run.
    cli = tiny_cli(shards, "--trainer.max_steps", "200")
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    resumed = logged(tmp_path / "b", version=1)
    assert sorted(resumed) == list(range(stopped, 200))  # it continued; it did not start again
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    ckpt = torch.load(tmp_path / "b/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["lvm_config"] == LVMConfig.from_name("tiny", **MINI).to_dict()
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in LVM(LVMConfig(**MINI)).state_dict()}

    # Stopped on the last batch of the stream's first epoch (step 122): the resume starts the next epoch, whole.
    enter(tmp_path / "c", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "200")
    cli.trainer.callbacks.append(SignalAt(121))  # sent after step 121 was looked at: it stops after step 122
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(tmp_path / "c/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 122 and ckpt["LVMDataModule"]["batches_consumed"] == 122
    cli = tiny_cli(shards, "--trainer.max_steps", "200")
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    resumed = logged(tmp_path / "c", version=1)
    assert sorted(resumed) == list(range(122, 200))  # labelled by the optimizer steps they describe
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_training_loss_keeps_packed_sentences_apart():
    """`data.doc_ids: true` (every config): the loss attends only within each packed sentence."""
    torch.manual_seed(0)
    module = LVMModule(overrides=MINI)
    module.configure_model()
    x = torch.randint(0, CODEBOOK_SIZE, (2, 17))
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 11 + [1] * 5])
    with torch.no_grad():
        loss = module._loss({"input_ids": x[:, :-1], "labels": x[:, 1:], "doc_ids": docs})
        logits = module.model(x[:, :-1], doc_ids=docs)
        unmasked = module.model(x[:, :-1])
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item(),
                                 rel=1e-6)
    assert loss != pytest.approx(torch.nn.functional.cross_entropy(unmasked.flatten(0, 1), x[:, 1:].flatten()).item(),
                                 rel=1e-5)


@pytest.mark.parametrize(("signum", "times"), [(signal.SIGTERM, 2), (signal.SIGINT, 1)], ids=["SIGTERM", "Ctrl-C"])
def test_lightning_fit_stopped_by_a_signal_exits_128_plus_its_number_with_one_line(shards, tmp_path, monkeypatch,
                                                                                   capsys, signum, times):
    """As a process killed by the signal would (143, or 130 for Ctrl-C): `lightning fit ... && export` must not go
    on with an unfinished model. The stop is announced once, when the signal comes (SIGTERM is sent twice: it may
    come again, from the scheduler or to the whole process group)."""
    enter(tmp_path / "a", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        lvm_cli.main(["fit", "-c", TINY, "--data.train_shards", str(shards), *FAST, "--trainer.max_steps", "20",
                      "--trainer.callbacks+=test_train.SignalAt", "--trainer.callbacks.step=3",
                      f"--trainer.callbacks.signum={int(signum)}", f"--trainer.callbacks.times={times}"])
    assert exit_info.value.code == 128 + signum
    err = capsys.readouterr().err.splitlines()
    name = signal.Signals(signum).name
    assert err[-1] == f"stopped by {name} with a checkpoint; continue with the same command and --ckpt_path last"
    announced = "Ctrl-C" if signum == signal.SIGINT else name
    assert err.count(f"{announced}: stopping after this optimizer step with a checkpoint (Ctrl-C again: at once)") == 1
    # sent after StopOnSignal looked at step 3, so it stops after step 4
    assert torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_a_fresh_fit_into_an_earlier_runs_checkpoints_is_refused(shards, tmp_path, monkeypatch, capsys):
    """The first command again after a preemption (no --ckpt_path) started at step 0 and overwrote the run's
    checkpoints of the same steps, moving last.ckpt to itself (review 39 #3)."""
    enter(tmp_path / "a", monkeypatch)
    command = ["fit", "-c", TINY, "--data.train_shards", str(shards), *FAST, "--model.warmup_steps", "1",
               "--trainer.max_steps", "2"]
    lvm_cli.main(command)
    checkpoints = tmp_path / "a/runs/lvm_tiny/checkpoints"
    kept = (checkpoints / "step=00000002.ckpt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        lvm_cli.main(command)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: runs/lvm_tiny/checkpoints holds the checkpoints of an earlier run, which a fresh start would overwrite "
        "(last.ckpt included): continue it with --ckpt_path last, or start anew in another folder (move this one "
        "away, or change the run's paths)\n")
    assert (checkpoints / "step=00000002.ckpt").read_bytes() == kept
    lvm_cli.main([*command[:-1], "3", "--ckpt_path", "last"])  # the resume goes on
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    capsys.readouterr()
    lvm_cli.main([*command[:-1], "3", "--ckpt_path", "last"])  # finished: it said "resuming" and nothing more (review 55 #8)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nothing to train: the checkpoint is at step 3 >= trainer.max_steps 3; raise --trainer.max_steps to continue "
        "(a wsd schedule extends: docs/training.md)")
    # without last.ckpt (a copy without links), `--ckpt_path last` started at step 0 over every checkpoint, exit 0
    # (review 55 #1); `best` without a monitor was a traceback (#9); a save killed midway left its .tmp for good (#6)
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / "step=00000003.ckpt.tmp").write_bytes(b"cut short")
    kept = {p.name: p.read_bytes() for p in checkpoints.glob("*.ckpt")}
    capsys.readouterr()
    for path, message in (("last", "--ckpt_path last: runs/lvm_tiny/checkpoints holds checkpoints but no last.ckpt (a "
                                   "copy that dropped links, or a kill while it was moved on), and Lightning would "
                                   "start at step 0 over them: continue from the newest, --ckpt_path "
                                   "runs/lvm_tiny/checkpoints/step=00000003.ckpt"),
                          ("best", "--ckpt_path best: no ModelCheckpoint of this config has a monitor, so none is "
                                   "best; give 'last' or a .ckpt file")):
        with pytest.raises(SystemExit) as exit_info:
            lvm_cli.main([*command[:-1], "4", "--ckpt_path", path])
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert {p.name: p.read_bytes() for p in checkpoints.glob("*.ckpt")} == kept
    assert not list(checkpoints.glob("*.tmp"))
    single = tmp_path / "single.yaml"  # `callbacks:` as one mapping, which Lightning takes too (review 42 #3)
    single.write_text("trainer:\n  callbacks:\n    class_path: lvm.callbacks.ModelCheckpoint\n    init_args:\n"
                      "      dirpath: runs/lvm_tiny/checkpoints\n")
    with pytest.raises(SystemExit) as exit_info:
        lvm_cli.main([*command, "-c", str(single)])
    assert exit_info.value.code == 2 and "holds the checkpoints of an earlier run" in capsys.readouterr().err


@pytest.mark.parametrize("when", ["before training", "twice in training"])
def test_lightning_fit_interrupted_exits_130_with_one_line(shards, tmp_path, monkeypatch, capsys, when):
    """Ctrl-C that Lightning handles itself (a second one stops at once) or that comes before the trainer runs is
    `interrupted` and 130, as in the `python -m` commands; Lightning exits 1 (a failure) or with a traceback."""
    enter(tmp_path / "a", monkeypatch)
    args = ["fit", "-c", TINY, "--data.train_shards", str(shards), *FAST, "--trainer.max_steps", "20"]
    if when == "before training":
        def interrupt(self):
            raise KeyboardInterrupt
        monkeypatch.setattr(lvm_cli.CLI, "before_instantiate_classes", interrupt)
    else:
        args += ["--trainer.callbacks+=test_train.InterruptMidStep", "--trainer.callbacks.step=3"]
    with expect_stop() as exit_info:
        lvm_cli.main(args)
    assert exit_info.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


class SignalMidStep(L.Callback):
    """Sends `signum`, `times` times, in micro-batch `micro_batch` (0 or 1) of optimizer step `step + 1`
    (2 micro-batches per step): at its start, or at its end (after StopOnSignal has looked at it)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, micro_batch: int = 0, at: str = "end",
                 times: int = 1) -> None:
        self.step, self.signum, self.micro_batch, self.at, self.times = step, signum, micro_batch, at, times
        self.sent = False

    def _send(self, trainer, batch_idx: int, at: str) -> None:
        if at == self.at and trainer.global_step == self.step and batch_idx % 2 == self.micro_batch and not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer, batch_idx, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._send(trainer, batch_idx, "end")


@pytest.mark.parametrize(("stop", "steps"), [
    (dict(), 6),  # SIGTERM after the first micro-batch: after the step
    (dict(at="start"), 6),  # SIGTERM as the first micro-batch starts: still after the step, not after that micro-batch
    (dict(signum=signal.SIGINT, micro_batch=1, at="start", times=2), 5),  # Ctrl-C twice in the last one: at once
], ids=["sigterm after the first micro-batch", "sigterm before it ends", "ctrl-c twice in the last micro-batch"])
def test_a_stop_inside_a_gradient_accumulation_checkpoints_only_finished_steps(shards, tmp_path, monkeypatch, stop,
                                                                               steps):
    """A signal stops after the optimizer step; a second Ctrl-C stops at once, and its checkpoint counts only the
    micro-batches of finished steps. It must hold every micro-batch it counts as consumed, or a resume would skip
    some."""
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "20", "--trainer.accumulate_grad_batches", "2")
    cli.trainer.callbacks.append(SignalMidStep(5, **stop))
    with expect_stop():
        cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["LVMDataModule"]["batches_consumed"]) == (steps, 2 * steps)


class InterruptMidStep(L.Callback):
    """Ctrl-C pressed twice (two real SIGINTs) in the backward pass of optimizer step `step + 1`: stop at once."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # StopOnSignal holds the first ...
            os.kill(os.getpid(), signal.SIGINT)  # ... and raises KeyboardInterrupt on the second


@pytest.mark.parametrize("accumulate", ["1", "2"])
def test_ctrl_c_stops_after_the_step_or_at_once_and_resumes_the_same_loss_curve(shards, tmp_path, monkeypatch,
                                                                                   accumulate):
    """One Ctrl-C stops after the optimizer step (StopOnSignal), as SIGTERM does. A second one stops at once:
    Lightning saves a checkpoint inside the step, which must count only the batches of finished steps, or the
    resumed run skips the interrupted one. (Inside an accumulation Lightning's own loop counters cannot resume
    exactly, so that case is the graceful one.)"""
    args = ("--trainer.max_steps", "14", "--trainer.accumulate_grad_batches", accumulate)
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, *args)
    cli.trainer.fit(cli.model, cli.datamodule)
    reference = logged(tmp_path / "a")

    enter(tmp_path / "b", monkeypatch)
    cli = tiny_cli(shards, *args)
    cli.trainer.callbacks.append(SignalMidStep(5, signal.SIGINT) if accumulate == "2" else InterruptMidStep(5))
    with expect_stop():
        cli.trainer.fit(cli.model, cli.datamodule)
    stopped = 6 if accumulate == "2" else 5
    ckpt = torch.load(tmp_path / "b/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == stopped and ckpt["LVMDataModule"]["batches_consumed"] == stopped * int(accumulate)
    cli = tiny_cli(shards, *args)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    resumed = logged(tmp_path / "b", version=1)
    assert cli.trainer.global_step == 14 and sorted(resumed) == list(range(stopped, 14))
    for step in resumed:  # exactly the uninterrupted run's losses, under the same step labels
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    # and the learning rate too: the first resumed row was labelled a step ahead (review 61 #8)
    rates, reference_rates = (logged(tmp_path / run, version=v, key="lr-AdamW/pg1") for run, v in (("b", 1), ("a", 0)))
    assert rates and rates == {step: reference_rates[step] for step in rates} and min(rates) == stopped


def test_a_stops_checkpoint_joins_the_rotation_of_the_newest_kept(shards, tmp_path, monkeypatch):
    """The paper configs keep the 3 newest periodic checkpoints; each preemption's checkpoint was kept for good
    besides them (39 GB at 3b) (review 42 #12)."""
    enter(tmp_path / "a", monkeypatch)

    def run(*args: str, ckpt_path: str | None = None) -> None:
        cli = tiny_cli(shards, "--trainer.max_steps", "16", *args)
        checkpoint = cli.trainer.checkpoint_callback
        checkpoint._every_n_train_steps, checkpoint.save_top_k, checkpoint.monitor, checkpoint.mode = 4, 2, "step", "max"
        checkpoint.kth_value = torch.tensor(-float("inf"))  # as Lightning sets it up for mode max
        if not ckpt_path:
            cli.trainer.callbacks.append(SignalAt(5))
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)

    with pytest.raises(SystemExit):
        run()  # stopped after step 6, between the periodic ones at 4 and 8
    checkpoints = tmp_path / "a/runs/lvm_tiny/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step=*.ckpt")) == ["step=00000004.ckpt", "step=00000006.ckpt"]
    run(ckpt_path="last")
    assert sorted(p.name for p in checkpoints.glob("step=*.ckpt")) == ["step=00000012.ckpt", "step=00000016.ckpt"]


def test_a_resume_with_another_shape_or_decay_groups_is_one_line_and_a_signal_in_the_last_step_finishes(
        shards, tmp_path, monkeypatch):
    """Both were 20-60 line tracebacks; a SIGTERM in the last step reported a stop (exit 143) of a finished run
    (review 42 #2, #14b)."""
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "12")
    cli.trainer.callbacks.append(SignalAt(11))  # after the last step's check: the run is complete anyway
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 12 and not cli.trainer.received_sigterm
    wider = str({**MINI, "dim": 64})
    cli = tiny_cli(shards, "--trainer.max_steps", "14", "--model.overrides", wider)
    with pytest.raises(ConfigError, match=r"^model.size / model.overrides: the checkpoint's model has dim 32 \(now "
                                          r"64\); resume with its shape$"):
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    cli = tiny_cli(shards, "--trainer.max_steps", "14", "--model.decay_norms_and_embeddings", "true")
    with pytest.raises(ConfigError, match=r"^model.decay_norms_and_embeddings: the checkpoint was trained with False"):
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last")
    # a tokenizer's checkpoint records no class to refuse it by: it was 23 KB of missing keys (review 61 #5)
    other = torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=False)
    del other["lvm_config"]
    torch.save(other, tmp_path / "vqgan.ckpt")
    cli = tiny_cli(shards, "--trainer.max_steps", "14")
    with pytest.raises(ConfigError, match=r"^--ckpt_path: the checkpoint holds no LVM \(no lvm_config\)"):
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(tmp_path / "vqgan.ckpt"))


@pytest.mark.parametrize("named", [False, True])
def test_a_resume_trains_with_this_runs_optimizer_settings(shards, tmp_path, monkeypatch, named):
    """AdamW's saved groups brought back the old lr, weight decay and betas (a resume at a lower lr after a NaN stop
    kept the old one), and a named checkpoint's settings replaced the command line's (review 42 #1)."""
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "12", "--model.schedule", "constant")
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt_path = str(tmp_path / "a/runs/lvm_tiny/checkpoints/step=00000012.ckpt") if named else "last"
    changed = ["--model.schedule", "constant", "--model.lr", "1e-3", "--model.weight_decay", "0.0",
               "--model.betas", "[0.8, 0.9]", "--trainer.max_steps", "16"]
    cli = lvm_cli.CLI(subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=["-c", TINY, "--data.train_shards", str(shards), *FAST, *changed])
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    lrs = logged(tmp_path / "a", version=1, key="lr-AdamW/pg1")
    assert sorted(lrs) == list(range(12, 16)) and set(lrs.values()) == {1e-3}
    groups = torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [(g["lr"], g["initial_lr"], g["weight_decay"], tuple(g["betas"])) for g in groups] == [(1e-3, 1e-3, 0.0, (0.8, 0.9))] * 2


def test_the_learning_rate_is_logged_once_per_optimizer_step(shards, tmp_path, monkeypatch):
    """Lightning's monitor wrote each rate once per micro-batch: 3 identical rows a step at accumulation 3 (review
    55 #10)."""
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "4", "--trainer.accumulate_grad_batches", "3", "--model.warmup_steps", "1")
    cli.trainer.fit(cli.model, cli.datamodule)
    rows = csv.DictReader((tmp_path / "a/runs/lvm_tiny/logs/version_0/metrics.csv").open())
    assert [int(row["step"]) for row in rows if row.get("lr-AdamW/pg1")] == [0, 1, 2, 3]


def test_a_stop_is_saved_even_when_its_step_is_not_among_the_best_of_a_monitored_metric(shards, tmp_path, monkeypatch):
    """Through the top-k rotation alone, a stop that a monitored metric ranks out saved nothing and last.ckpt stayed
    behind (review 43 #3)."""
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "16")
    checkpoint = cli.trainer.checkpoint_callback
    checkpoint._every_n_train_steps, checkpoint.save_top_k, checkpoint.monitor, checkpoint.mode = 4, 1, "step", "min"
    checkpoint.kth_value = torch.tensor(float("inf"))  # as Lightning sets it up for mode min
    cli.trainer.callbacks.append(SignalAt(5))
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6


def test_last_ckpt_follows_a_run_resumed_from_its_first_periodic_checkpoint(shards, tmp_path, monkeypatch):
    """That checkpoint was saved before `last.ckpt` existed; Lightning's version counter would then write the newer
    ones as last-v1.ckpt and leave last.ckpt, which loading and export read, on the old step."""
    enter(tmp_path / "a", monkeypatch)
    for max_steps, ckpt_path in (("12", None), ("16", "last")):
        cli = tiny_cli(shards, "--trainer.max_steps", max_steps)
        cli.trainer.checkpoint_callback._every_n_train_steps = 12
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    checkpoints = tmp_path / "a/runs/lvm_tiny/checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 16
    assert not list(checkpoints.glob("*-v1.ckpt"))



@pytest.mark.parametrize("every", ["5 train steps", "validation"])
def test_the_final_step_is_saved_when_max_steps_is_no_multiple_of_the_checkpoint_interval(shards, tmp_path,
                                                                                          monkeypatch, every):
    """Lightning's ModelCheckpoint writes last.ckpt at the end only when it saved nothing before: the demo's 650 steps
    with a checkpoint every 100 ended at step 600. So do checkpoints that follow validation (no
    every_n_train_steps, as lvm/demo/configs/vqgan.yaml): last.ckpt stayed at the last validation's step."""
    args = ["--trainer.max_steps", "13"]
    if every == "validation":
        val = write_sentence_shards(tmp_path / "val", shards=1)
        args += ["--data.val_shards", str(val), "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "1"]
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, *args)
    if every == "validation":  # Lightning's default when no interval is given
        cli.trainer.checkpoint_callback._every_n_train_steps, cli.trainer.checkpoint_callback._every_n_epochs = 0, 1
    else:
        cli.trainer.checkpoint_callback._every_n_train_steps = 5
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoints = tmp_path / "a/runs/lvm_tiny/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step=*.ckpt")) == [f"step={s:08d}.ckpt" for s in (5, 10, 13)]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 13


def test_resume_from_a_periodic_checkpoint_with_gradient_accumulation_and_validation(shards, tmp_path, monkeypatch):
    val = write_sentence_shards(tmp_path / "val", shards=1)
    args = ("--trainer.max_steps", "16", "--trainer.accumulate_grad_batches", "2", "--data.val_shards", str(val),
            "--trainer.val_check_interval", "16")  # batches: validation after steps 8 and 16
    enter(tmp_path / "a", monkeypatch)
    cli = tiny_cli(shards, *args)
    cli.trainer.checkpoint_callback._every_n_train_steps = 8  # periodic checkpoints at steps 8 and 16
    cli.trainer.fit(cli.model, cli.datamodule)
    reference = logged(tmp_path / "a")
    assert sorted(reference) == list(range(16))
    # training batches only (16 steps x 2 micro-batches): validation after step 8 read batches of its own stream
    last = torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert last["LVMDataModule"]["batches_consumed"] == 32
    # val/loss after the last step: the mean loss of the final model over the whole validation stream
    val_loss = logged(tmp_path / "a", key="val/loss")
    assert sorted(val_loss) == [7, 15]
    model = cli.model.model.eval()
    loader = torch.utils.data.DataLoader(PackedStream(str(val), 32, 2, seed=0, rank=0, world_size=1), batch_size=None, num_workers=2)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()) for b in loader]
    assert val_loss[15] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)

    # A new run from the periodic checkpoint (not `last`) continues with exactly the same losses.
    enter(tmp_path / "b", monkeypatch)
    cli = tiny_cli(shards, *args)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(tmp_path / "a/runs/lvm_tiny/checkpoints/step=00000008.ckpt"))
    resumed = logged(tmp_path / "b")
    assert sorted(resumed) == list(range(8, 16))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert logged(tmp_path / "b", key="val/loss")[15] == pytest.approx(val_loss[15], rel=1e-5)

    # Validation reads no training stream: a checkpoint validates in another layout (review 55 #3: it was refused)
    enter(tmp_path / "c", monkeypatch)
    cli = tiny_cli(shards, *args[:-2], "--data.num_workers", "0", "--data.batch_size", "1")
    (result,) = cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=str(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt"))
    assert math.isfinite(result["val/loss"])
    # without val_shards it validated nothing and exited 0 (review 61 #7)
    cli = tiny_cli(shards, "--data.num_workers", "0")
    with pytest.raises(ConfigError, match=r"^data.val_shards: not set; lightning validate measures val/loss on it$"):
        cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=str(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt"))


class RecordBatches(L.Callback):
    """Saves each rank's input_ids per optimizer step to `out`, and a checkpoint `out/step_<save_at>.ckpt` after
    step `save_at` (mid-run: not the last). Named by class_path in the DDP subprocesses."""

    def __init__(self, out: str, save_at: int | None = None) -> None:
        self.out, self.save_at = Path(out), save_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(batch["input_ids"].cpu(), self.out / f"rank{trainer.global_rank}_step{trainer.global_step:03d}.pt")

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.out / f"step_{self.save_at}.ckpt")


def _ddp_fit(shards: Path, run_dir: Path, record: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "lvm.cli", "fit", "-c", TINY, "--data.train_shards", str(shards), *FAST,
           "--trainer.max_steps", "12", "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--model.warmup_steps", "2", "--data.num_workers", "1",
           "--trainer.callbacks+=test_train.RecordBatches", f"--trainer.callbacks.out={record}", *args]
    run_dir.mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)


def _recorded(record: Path, rank: int) -> dict[int, torch.Tensor]:
    return {int(p.stem.split("step")[1]): torch.load(p) for p in sorted(record.glob(f"rank{rank}_step*.pt"))}


def test_ddp_with_two_cpu_processes_splits_the_stream_and_resumes(shards, tmp_path):
    done = _ddp_fit(shards, tmp_path / "a", tmp_path / "a_batches", "--trainer.callbacks.save_at=6")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "a/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12
    position = {key: ckpt["LVMDataModule"][key] for key in ("epoch", "batches_consumed", "num_workers", "world_size")}
    assert position == {"epoch": 0, "batches_consumed": 12, "num_workers": 1, "world_size": 2}  # each rank's count
    reference = logged(tmp_path / "a")
    assert sorted(reference) == list(range(12)) and all(math.isfinite(v) for v in reference.values())
    # Each rank trains on its own part of the stream, exactly PackedStream(rank=r, world_size=2)'s batches.
    batches = [_recorded(tmp_path / "a_batches", rank) for rank in (0, 1)]
    for rank in (0, 1):
        expected = itertools.islice(PackedStream(str(shards), 32, 2, seed=0, rank=rank, world_size=2), 12)
        assert sorted(batches[rank]) == list(range(12))
        assert all(torch.equal(batches[rank][step], b["input_ids"]) for step, b in enumerate(expected)), rank
    assert not any(torch.equal(batches[0][step], batches[1][step]) for step in range(12))

    # Resumed from the checkpoint after step 6 in a new run: the same batches on each rank, the same losses.
    done = _ddp_fit(shards, tmp_path / "b", tmp_path / "b_batches", "--ckpt_path", str(tmp_path / "a_batches/step_6.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("resuming epoch 0 after 6 batches per device: ") == 1  # said once, by rank 0
    resumed = logged(tmp_path / "b")
    assert sorted(resumed) == list(range(6, 12))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    for rank in (0, 1):
        again = _recorded(tmp_path / "b_batches", rank)
        assert sorted(again) == list(range(6, 12)) and all(torch.equal(again[s], batches[rank][s]) for s in again)


def quick_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


class NaNAtStep3(LVMModule):
    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * float("nan") if self.global_step == 3 else loss


def test_nonfinite_loss_stops_naming_the_step(shards, tmp_path):
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 3 \(batch 3 of epoch 0\); no checkpoint comes "
                                                 r"before this stop's \(its weights gave it\): start anew"):
        quick_trainer().fit(NaNAtStep3(overrides=MINI, warmup_steps=1), dm)  # a fresh run that saved nothing yet
    saving = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"\(batch 3 of epoch 0\); resume from the checkpoint before this "
                                                 r"stop's \(its weights gave it\) with a lower model.lr, or set"):
        quick_trainer(enable_checkpointing=True, callbacks=[saving]).fit(NaNAtStep3(overrides=MINI, warmup_steps=1), dm)


class Snapshots(L.Callback):
    """The parameters after each optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        self.after[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def test_nonfinite_loss_can_skip_the_batch(shards):
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    module = NaNAtStep3(overrides=MINI, warmup_steps=1, on_nonfinite_loss="skip")
    snapshots = Snapshots()
    quick_trainer(callbacks=[snapshots]).fit(module, dm)
    assert module.skipped_batches == 1 and dm.batches_consumed == 6
    saved = {}
    module.on_save_checkpoint(saved)  # the count goes on after a resume (it restarted at 0)
    resumed = LVMModule(overrides=MINI, warmup_steps=1)
    resumed.on_load_checkpoint(saved)
    assert resumed.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the step with the NaN batch (the 4th, global_step 3 -> 4) left every parameter as it was; the others moved
    assert all(torch.equal(a, b) for a, b in zip(snapshots.after[3], snapshots.after[4]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots.after[4], snapshots.after[5]))


class InfGradientAtStep3(LVMModule):
    """A finite loss whose backward overflowed: one gradient entry inf, as bf16 or an fp16 scale can leave it."""

    def on_after_backward(self) -> None:
        if self.global_step == 3:
            self.model.norm.weight.grad[0] = float("inf")


def test_a_nonfinite_gradient_with_a_finite_loss_stops_or_is_skipped_before_the_update(shards):
    """Clipping by an infinite norm wrote NaN into the weights, which the NaN stop a step later then saved as the last
    good state (review 42 #8)."""
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    module = InfGradientAtStep3(overrides=MINI, warmup_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"^gradient norm is inf at step 3 \(the loss was finite\)"):
        quick_trainer().fit(module, dm)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    module, snapshots = InfGradientAtStep3(overrides=MINI, warmup_steps=1, on_nonfinite_loss="skip"), Snapshots()
    quick_trainer(callbacks=[snapshots]).fit(module, dm)
    assert module.skipped_batches == 1 and all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(snapshots.after[3], snapshots.after[4]))


def test_a_nonfinite_gradient_under_a_loss_scaler_is_left_to_it(shards):
    """fp16 (16-mixed on CUDA) overflows by design: its GradScaler skips the step and lowers the scale. Stopping
    there would end such runs at the first overflow (review 43 #7); the scaler is faked, as a CPU run has none."""
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    trainer = quick_trainer(max_steps=4)
    trainer.precision_plugin.scaler = object()
    trainer.fit(InfGradientAtStep3(overrides=MINI, warmup_steps=1), dm)  # no NonFiniteLossError
    assert trainer.global_step == 4


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_a_clip_value_of_zero_or_below_means_no_clipping_as_in_lightning(shards, clip):
    """torch's clipping by 0 zeroed every update and by -1 trained by gradient ascent (review 42 #4)."""
    params = []
    for value in (None, clip):
        torch.manual_seed(0)
        module = LVMModule(overrides=MINI, warmup_steps=1)
        quick_trainer(gradient_clip_val=value).fit(module, LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0))
        params.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_no_gradient_accumulation_or_a_limit_on_train_batches_is_one_line(shards):
    """A limit on train batches ended every Lightning epoch early and reshuffled the stream: most data never read."""
    for setting, message in ((dict(accumulate_grad_batches=0), r"trainer.accumulate_grad_batches: must be >= 1, got 0$"),
                             (dict(limit_train_batches=10), r"trainer.limit_train_batches: 10 is not supported"),
                             (dict(limit_train_batches=1), r"trainer.limit_train_batches: 1 is not supported")):  # 1 batch
        with pytest.raises(ConfigError, match=f"^{message}"):
            quick_trainer(**setting).fit(LVMModule(overrides=MINI, warmup_steps=1),
                                         LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0))
    with pytest.raises(ConfigError, match=r"^data.seed: must be >= 0, got -1$"):  # a worker's traceback
        LVMDataModule(str(shards), seed=-1)


class NaNOnRank0AtStep3(LVMModule):
    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * float("nan") if self.global_step == 3 and self.global_rank == 0 else loss


def test_nonfinite_loss_on_one_of_two_ddp_ranks_skips_or_stops_on_both(shards, tmp_path):
    """Lightning refuses a skipped training_step on several ranks; the step must be dropped on both instead."""
    model = ["--model", "test_train.NaNOnRank0AtStep3", "--model.warmup_steps", "1", "--trainer.max_steps", "6"]
    done = _ddp_fit(shards, tmp_path / "skip", tmp_path / "b1", *model, "--model.on_nonfinite_loss", "skip")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = logged(tmp_path / "skip")
    assert sorted(losses) == list(range(6)) and [s for s, v in losses.items() if not math.isfinite(v)] == [3]
    skipped = logged(tmp_path / "skip", key="train/skipped_batches")
    assert min(skipped) == 3 and set(skipped.values()) == {1.0}

    done = _ddp_fit(shards, tmp_path / "stop", tmp_path / "b2", *model)
    assert done.returncode != 0
    assert "loss is non-finite on 1 of 2 ranks (this rank: nan) at step 3 (batch 3 of epoch 0)" in done.stderr


def test_nan_stop_checkpoints_the_last_good_state_and_skips_are_logged(shards, tmp_path, monkeypatch):
    # configs/lvm_tiny.yaml as is (ModelCheckpoint with save_on_exception), the loss NaN at step 3.
    enter(tmp_path / "stop", monkeypatch)
    cli = tiny_cli(shards, "--model", "test_train.NaNAtStep3", "--model.warmup_steps", "1", "--trainer.max_steps", "6")
    with pytest.raises(NonFiniteLossError):
        cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(tmp_path / "stop/runs/lvm_tiny/checkpoints/last.ckpt", weights_only=True)
    # the batch that gave NaN was not trained on: a resume (at a lower lr, or with skip) reads it again
    assert ckpt["global_step"] == 3 and ckpt["LVMDataModule"]["batches_consumed"] == 3
    good = {f"model.{k}": v for k, v in cli.model.model.state_dict().items()}  # after step 3's update, before the NaN
    assert all(torch.isfinite(v).all() for v in good.values())
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in good.items())

    enter(tmp_path / "skip", monkeypatch)
    cli = tiny_cli(shards, "--model", "test_train.NaNAtStep3", "--model.warmup_steps", "1", "--trainer.max_steps", "6",
                   "--model.on_nonfinite_loss", "skip")
    cli.trainer.fit(cli.model, cli.datamodule)
    skipped = logged(tmp_path / "skip", key="train/skipped_batches")
    assert min(skipped) == 3 and set(skipped.values()) == {1.0}  # from the skipped step on


class MicroBatchLosses(L.Callback):
    """Each micro-batch's loss, computed here from the model and the batch (the weights stay the same within an
    optimizer step), by the optimizer step it belongs to."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        logits = pl_module.model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.losses.setdefault(trainer.global_step, []).append(loss.item())


def test_val_ppl_is_exp_of_the_mean_val_loss(shards, tmp_path):
    """It was the mean of per-batch exp, which exceeds it (review 42 #10)."""
    val = write_sentence_shards(tmp_path / "val", shards=1)
    dm = LVMDataModule(str(shards), val_shards=str(val), seq_len=32, batch_size=2, num_workers=0)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    quick_trainer(max_steps=4, logger=logger, val_check_interval=4, limit_val_batches=5, num_sanity_val_steps=0).fit(
        LVMModule(overrides=MINI, warmup_steps=1), dm)
    rows = [row for row in csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")) if row.get("val/loss")]
    ppl = next(float(row["val/ppl"]) for row in csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv"))
               if row.get("val/ppl"))
    assert ppl == pytest.approx(math.exp(float(rows[0]["val/loss"])), rel=1e-5)


def test_train_loss_is_the_mean_over_the_micro_batches_of_each_optimizer_step(shards, tmp_path):
    """Logged per micro-batch, Lightning kept the last one's loss only: a third of the step's tokens here."""
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    micro = MicroBatchLosses()
    trainer = quick_trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[micro], log_every_n_steps=1,
                            logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""))
    trainer.fit(LVMModule(overrides=MINI, warmup_steps=1), dm)
    rows = [row for row in csv.DictReader((tmp_path / "metrics.csv").open()) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]  # once per optimizer step
    assert [len(micro.losses[step]) for step in range(4)] == [3, 3, 3, 3]
    for row in rows:
        mean = sum(micro.losses[int(row["step"])]) / 3
        assert float(row["train/loss"]) == pytest.approx(mean, rel=1e-6), row["step"]
        assert float(row["train/ppl"]) == pytest.approx(math.exp(mean), rel=1e-6)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(mean, rel=1e-6)  # TrainingProgress's


def test_losses_left_by_a_stopped_fit_are_not_logged_by_the_next(shards, tmp_path):
    module = LVMModule(overrides=MINI, warmup_steps=1)
    module._step_losses = [torch.tensor(100.0)]  # what a fit stopped inside an accumulation leaves behind
    trainer = quick_trainer(max_steps=2, log_every_n_steps=1,
                            logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""))
    trainer.fit(module, LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0))
    first, _ = [row for row in csv.DictReader((tmp_path / "metrics.csv").open()) if row.get("train/loss")]
    assert float(first["train/loss"]) < 20  # ~ln(vocabulary) = 9, not a mean with the stale 100


@pytest.mark.parametrize("precision,logged_mfu", [("bf16-mixed", True), ("32-true", False)])
def test_mfu_is_logged_against_the_peak_table_of_lvm_peaks(shards, tmp_path, monkeypatch, precision, logged_mfu):
    """The training log's MFU uses the benchmarks' table (Lightning's lacks the H200 and doubles some cards),
    for half-precision runs only: the table holds bf16 peaks."""
    monkeypatch.setattr("lvm.callbacks.dense_bf16_peak", lambda device: 1e9)  # any card: a CPU stands in
    enter(tmp_path / "run", monkeypatch)
    cli = tiny_cli(shards, "--trainer.max_steps", "14", "--trainer.precision", precision)
    cli.trainer.fit(cli.model, cli.datamodule)
    flops = logged(tmp_path / "run", key="train/device/flops_per_sec")  # once the window of 10 batches is full
    assert len(flops) >= 3
    tokens = logged(tmp_path / "run", key="train/device/items_per_sec")  # tokens/s: 6N + attention FLOPs each
    per_token = cli.model.cfg.flops_per_token(32)
    assert all(flops[s] == pytest.approx(tokens[s] * per_token, rel=1e-4) for s in flops)
    if logged_mfu:
        mfu = logged(tmp_path / "run", key="train/device/mfu")
        assert mfu.keys() == flops.keys() and all(mfu[s] == pytest.approx(flops[s] / 1e9) for s in mfu)
    else:
        assert "train/device/mfu" not in (tmp_path / "run/runs/lvm_tiny/logs/version_0/metrics.csv").read_text()


@pytest.mark.parametrize(("precision", "has_peak"), [("bf16-mixed", True), ("bf16-true", True), ("16-mixed", True),
                                                     ("16-true", True), ("32-true", False), ("64-true", False)])
def test_mfu_counts_every_half_precision(monkeypatch, precision, has_peak):
    """fp16 runs have the same dense peak as bf16 on these cards; the training test above can only run bf16 on CPU."""
    from lightning.pytorch.callbacks import ThroughputMonitor

    monkeypatch.setattr(ThroughputMonitor, "setup", lambda self, trainer, module, stage: None)
    monkeypatch.setattr("lvm.callbacks.dense_bf16_peak", lambda device: 1e15)
    monitor = TokenThroughput()
    monitor._throughputs = {"train": types.SimpleNamespace(available_flops=None)}
    trainer = types.SimpleNamespace(precision=precision, strategy=types.SimpleNamespace(root_device=torch.device("cuda")))
    monitor.setup(trainer, None, "fit")
    assert monitor._throughputs["train"].available_flops == (1e15 if has_peak else None)


def test_training_progress_line_measures_this_runs_steps_and_prints_at_most_every_every_s(monkeypatch, capsys):
    """A run resumed at step 10 that made 5 steps in 10 s: 2 s a step, and the 5 steps left take 10 s. Measured from
    the steps since the start of this run, not since step 0; printed again only after `every_s` seconds."""
    from lvm.callbacks import TrainingProgress

    clock = iter([100.0, 110.0, 112.0, 114.0])
    monkeypatch.setattr("lvm.callbacks.time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    trainer = types.SimpleNamespace(global_step=10, max_steps=20, is_global_zero=True, checkpoint_callback=None,
                                    callback_metrics={"train/loss": torch.tensor(1.23456)}, datamodule=None)
    progress = TrainingProgress(every_s=5)
    progress.on_train_start(trainer, None)
    trainer.global_step = 15
    progress.on_train_batch_end(trainer)  # at 110 s
    trainer.global_step = 16
    progress.on_train_batch_end(trainer)  # at 112 s: 2 s after the last line
    progress.on_train_end(trainer, None)  # at 114 s
    assert capsys.readouterr().err.splitlines() == [
        "step 15/20 (75.0%) | loss 1.2346 | 2.00 s/step | ETA 0:00:10",
        "trained steps 10..16 in 0:00:14; last loss 1.2346; checkpoints in none",
    ]


def test_peak_table_matches_the_longest_name(monkeypatch):
    from lvm.peaks import dense_bf16_peak

    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA GeForce GTX 1080", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert dense_bf16_peak(cuda) == peak, name
    assert dense_bf16_peak(torch.device("cpu")) is None


def test_gradients_are_clipped_to_the_global_norm():
    """Every config clips at 1.0 through configure_gradient_clipping (Lightning's clipping is replaced)."""
    torch.manual_seed(0)
    module = LVMModule(overrides=MINI)
    module.configure_model()
    x = torch.randint(0, CODEBOOK_SIZE, (2, 17))
    module._loss({"input_ids": x[:, :-1], "labels": x[:, 1:]}).backward()
    before = [p.grad.clone() for p in module.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before]))
    assert norm > 0.01
    module.configure_gradient_clipping(None, gradient_clip_val=1e-3)
    for g, p in zip(before, module.parameters()):  # one scale for all: the direction is kept
        torch.testing.assert_close(p.grad, g * (1e-3 / norm), rtol=1e-4, atol=1e-9)


def test_invalid_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"^model\.size: unknown LVM size 'huge'"):
        LVMModule(size="huge")
    with pytest.raises(ConfigError, match=r"^model\.overrides: unknown LVMConfig field\(s\) width"):
        LVMModule(overrides={"width": 3})
    with pytest.raises(ConfigError, match=r"^model\.overrides: LVMConfig\.dim \(130\)"):
        LVMModule(overrides={"dim": 130})
    with pytest.raises(ConfigError, match=r"^model\.lr: must be > 0, got -1\.0"):
        LVMModule(lr=-1.0)


def test_config_errors_come_before_any_data_is_read(tmp_path):
    # A shard that fails if anything opens it: the errors below must come first.
    (tmp_path / "00000.tar").write_bytes(b"not a tar")
    dm = LVMDataModule(str(tmp_path), seq_len=32, batch_size=2, num_workers=0)
    with pytest.raises(ConfigError, match=r"^model\.warmup_steps: 10 must be below trainer\.max_steps \(6\)"):
        quick_trainer().fit(LVMModule(overrides=MINI, warmup_steps=10), dm)
    with pytest.raises(ConfigError, match=r"^data\.seq_len: 32 exceeds the model's context \(max_seq_len 16\)"):
        quick_trainer().fit(LVMModule(overrides={**MINI, "max_seq_len": 16}, warmup_steps=1), dm)
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps: must be set"):
        quick_trainer(max_steps=-1, max_epochs=1).fit(LVMModule(overrides=MINI), dm)


def test_schedule_warms_up_then_decays_to_min_lr():
    lr = [lr_multiplier(s, warmup_steps=10, max_steps=110, min_ratio=0.2) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[10] == 1.0
    assert lr[60] == pytest.approx(0.6)  # half way through the cosine: (1 + 0.2) / 2
    assert lr[110] == lr[119] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_is_stable_then_decays_over_the_last_fraction(shape):
    lr = [lr_multiplier(s, 10, 100, 0.1, schedule="wsd", decay_fraction=0.2, decay_shape=shape) for s in range(110)]
    assert lr[0] == pytest.approx(0.1) and all(v == 1.0 for v in lr[9:81])  # stable until step 80
    quarter = 0.75 if shape == "linear" else 0.5  # 1 - 0.25 or 1 - sqrt(0.25), a quarter into the decay
    assert lr[85] == pytest.approx(0.1 + 0.9 * quarter)
    assert lr[100] == lr[109] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[80:], lr[81:]))


def test_constant_schedule_only_warms_up():
    lr = [lr_multiplier(s, 5, 50, 0.1, schedule="constant") for s in range(60)]
    assert lr[0] == pytest.approx(0.2) and all(v == 1.0 for v in lr[4:])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_module_trains_with_the_configured_schedule(schedule, shards):
    """The optimizer's learning rate follows `lr_multiplier` step by step under Lightning."""
    module = LVMModule(overrides=MINI, lr=1e-3, min_lr=1e-4, warmup_steps=2, schedule=schedule, decay_fraction=0.5)
    seen = []
    module.on_train_batch_start = lambda *_: seen.append(module.optimizers().param_groups[0]["lr"])
    quick_trainer(max_steps=8).fit(module, LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0))
    expected = [1e-3 * lr_multiplier(s, 2, 8, 0.1, schedule=schedule, decay_fraction=0.5) for s in range(8)]
    assert seen == pytest.approx(expected)


def test_bad_schedule_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^model\.decay_fraction: must be in \(0, 1\], got 0"):
        LVMModule(overrides=MINI, schedule="wsd", decay_fraction=0.0)


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_groups(decay_all):
    module = LVMModule(overrides=MINI, weight_decay=0.1, decay_norms_and_embeddings=decay_all, betas=[0.8, 0.9], eps=1e-6)
    module.configure_model()
    module.trainer = quick_trainer()
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6  # the config's, not defaults
    names = {id(p): n for n, p in module.model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    expected = set() if decay_all else {"embed.weight", "norm.weight"} | {
        f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "mlp")}
    assert exempt == expected


def test_tied_head_is_optimised_once_without_decay():
    module = LVMModule(overrides={**MINI, "tie_embeddings": True}, weight_decay=0.1)
    module.configure_model()
    module.trainer = quick_trainer()
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert any(p is module.model.embed.weight for p in no_decay["params"])
    assert not any(p is module.model.embed.weight for p in decay["params"])


def test_meta_materialisation_initialises_like_eager_construction():
    # What FSDP does with a model built on the meta device: per module that owns tensors,
    # allocate them and call that module's reset_parameters().
    cfg = LVMConfig(dim=128, mlp_dim=256, n_layers=8, n_heads=4, max_seq_len=32)
    with torch.device("meta"):
        model = LVM(cfg)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()
    eager = LVM(cfg)
    torch.testing.assert_close(model.rope_cos, eager.rope_cos)
    assert isinstance(model.head, Linear)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (model.norm.weight == 1).all()


def test_atomic_checkpoint_io_leaves_the_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path) == {"step": 1} and not path.with_name("last.ckpt.tmp").exists()

    def killed(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}


def _first_sentence(row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens from a BOS of `row` that fit in it."""
    start = next(int(p) for p in (row == BOS_ID).nonzero().flatten() if p + length <= len(row))
    return row[start : start + length]


def _greedy(model: LVM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy codes after prompt [T], by full recomputation (no KV cache), special ids never chosen."""
    tokens = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens)[:, -1, :CODEBOOK_SIZE].argmax(-1, keepdim=True)], 1)
    return tokens[0, -n:]


def test_sample_images_decodes_a_continuation(tiny_tokenizer, shards):
    callback = SampleImages(tokenizer="unused", every_n_steps=1, context_images=1, temperature=0.0, top_k=None)
    callback._tokenizer = tiny_tokenizer
    batch = next(iter(LVMDataModule(str(shards), seq_len=64, batch_size=1, num_workers=0).train_dataloader()))
    torch.manual_seed(0)
    model = LVM(LVMConfig(**MINI))
    images = callback.sample(model, batch["input_ids"][0], torch.autocast("cpu", enabled=False))
    sentence = _first_sentence(batch["input_ids"][0], 1 + 2 * 16)  # BOS, context image, true next image
    expected = torch.stack([sentence[1:17], _greedy(model.eval(), sentence[:17], 16), sentence[17:]])
    assert torch.equal(images, tiny_tokenizer.decode(expected))  # context | sampled | true


def test_sample_images_skips_sentences_too_short_for_the_window(tiny_tokenizer):
    """One-image sentences come first: the window must not run through their EOS into the next sentence."""
    callback = SampleImages(tokenizer="unused", every_n_steps=1, context_images=1, temperature=0.0, top_k=None)
    callback._tokenizer = tiny_tokenizer
    a, b, c = (torch.randint(0, tiny_tokenizer.codebook_size, (16,)) for _ in range(3))
    bos, eos = torch.tensor([BOS_ID]), torch.tensor([EOS_ID])
    row = torch.cat([bos, a, eos, bos, a, eos, bos, b, c, eos])
    torch.manual_seed(0)
    images = callback.sample(LVM(LVMConfig(**MINI)), row, torch.autocast("cpu", enabled=False))
    context, true = tiny_tokenizer.decode(torch.stack([b, c]))
    assert torch.equal(images[0], context) and torch.equal(images[2], true)


def test_sample_images_refuses_another_tokenizer_than_the_sentences_one(tiny_tokenizer_dir, tiny_tokenizer):
    """A 16-token tokenizer cut 64-token images into noise, and a smaller codebook never found a sentence to
    sample, silently for the whole run (review 56 #3)."""
    given = tiny_tokenizer.identity(str(tiny_tokenizer_dir))
    for made, refused in ((None, False), (given, False), ({**given, "digest": "0" * 40}, True)):
        trainer = types.SimpleNamespace(is_global_zero=True, datamodule=types.SimpleNamespace(tokenizer=made))
        callback = SampleImages(tokenizer=str(tiny_tokenizer_dir))
        if refused:
            with pytest.raises(ConfigError, match=r"^SampleImages.tokenizer: .* is not the tokenizer that made the "
                                                  r"training sentences, .*digest 000000000000.*: give that one"):
                callback.setup(trainer, None, "fit")
        else:
            callback.setup(trainer, None, "fit")
            assert callback._tokenizer.codebook_size == tiny_tokenizer.codebook_size


def test_sample_images_writes_a_png_during_training(tiny_tokenizer_dir, tiny_tokenizer, shards, tmp_path):
    dm = LVMDataModule(str(shards), seq_len=64, batch_size=1, num_workers=0)
    callback = SampleImages(tokenizer=str(tiny_tokenizer_dir), every_n_steps=3)
    quick_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[callback]).fit(LVMModule(overrides=MINI, warmup_steps=1), dm)
    image = torchvision.io.read_image(str(tmp_path / "samples/step_00000003.png"))
    assert image.shape == (3, 64 + 4, 3 * 64 + 8)  # context | sampled | true, 2-pixel grid padding
    third_batch = list(itertools.islice(LVMDataModule(str(shards), seq_len=64, batch_size=1, num_workers=0).train_dataloader(), 3))[-1]
    sentence = _first_sentence(third_batch["input_ids"][0], 1 + 2 * 16)  # the batch of step 3
    context, true = tiny_tokenizer.decode(torch.stack([sentence[1:17], sentence[17:]]))
    assert torch.equal(image[:, 2:66, 2:66], context) and torch.equal(image[:, 2:66, 134:198], true)


def test_sample_images_settings_are_checked_before_the_first_step(shards, tmp_path):
    """A wrong tokenizer path stopped the run at its first sample (5,000 steps into the paper configs), and an
    interval of 0 was a ZeroDivisionError (review 42 #7)."""
    with pytest.raises(ConfigError, match=r"^SampleImages.every_n_steps: must be >= 1, got 0$"):
        SampleImages(tokenizer="t", every_n_steps=0)
    with pytest.raises(ConfigError, match=r"^TokenThroughput.window_size: must be >= 2 \(a rate needs two batches\), got 1$"):
        TokenThroughput(window_size=1)  # Lightning's bare AssertionError once training started (review 61 #4)
    module = LVMModule(overrides=MINI, warmup_steps=1)
    with pytest.raises(UserError, match=r"^SampleImages.tokenizer: .*nope: no such file or directory"):
        quick_trainer(max_steps=3, callbacks=[SampleImages(tokenizer=str(tmp_path / "nope"), every_n_steps=3)]).fit(
            module, LVMDataModule(str(shards), seq_len=64, batch_size=1, num_workers=0))
    assert module.global_step == 0


@pytest.mark.parametrize("size", ["tiny", "300m", "600m", "1b", "3b"])
def test_configs_parse(size, capsys):
    with pytest.raises(SystemExit) as done:
        lvm_cli.main(["fit", "-c", str(ROOT / f"configs/lvm_{size}.yaml"), "--print_config"])
    assert done.value.code == 0
    assert f"size: {size}" in capsys.readouterr().out


TRAINING_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("lvm/demo/configs/*.yaml")])


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_every_training_config_saves_the_final_step_and_stops_resumably(config):
    """Only configs/lvm_tiny.yaml is trained by the tests: the others must list the same stop and save callbacks.
    Lightning's own ModelCheckpoint loses the steps after the last save, its version counter writes last-v1.ckpt
    beside the last.ckpt that --ckpt_path last and tokenizer.load read, and without StopOnSignal and
    save_on_exception a SIGTERM or Ctrl-C leaves no checkpoint to resume from."""
    import yaml

    trainer = yaml.safe_load((ROOT / config).read_text())["trainer"]
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in trainer["callbacks"]}
    (checkpoint,) = [name for name in callbacks if name.endswith("ModelCheckpoint")]
    assert checkpoint == "lvm.callbacks.ModelCheckpoint"
    args = callbacks[checkpoint]
    assert args["save_last"] in (True, "link") and args["enable_version_counter"] is False
    assert args["save_on_exception"] is True and "lvm.callbacks.StopOnSignal" in callbacks
    assert "lvm.callbacks.TrainingProgress" in callbacks
    assert "lvm.callbacks.AtomicCheckpointIO" in [p["class_path"] for p in trainer["plugins"]]


@pytest.mark.parametrize("size", ["1b", "3b"])
def test_sharded_configs_use_fsdp2_with_recomputation_and_one_checkpoint_file(size):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import ModelParallelStrategy

    config = yaml.safe_load((ROOT / f"configs/lvm_{size}.yaml").read_text())
    section = config["trainer"]["strategy"]
    assert section["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    parser = ArgumentParser()
    parser.add_class_arguments(ModelParallelStrategy, "strategy")
    strategy = parser.instantiate(parser.parse_object({"strategy": section["init_args"]})).strategy
    assert strategy._save_distributed_checkpoint is False  # one .ckpt gathered on rank 0
    assert config["model"]["init_args"]["activation_checkpointing"] is True


def test_3b_dry_run_reports_parameters_without_allocating(capsys):
    train.main(["-c", str(ROOT / "configs/lvm_3b.yaml")])
    out = capsys.readouterr().out
    assert f"parameters {LVMConfig.from_name('3b').num_params():,} (3.275 B)" in out
    assert "65,536 per optimizer step per device" in out and "524,288 on 8 devices" in out
    assert "ModelParallelStrategy" in out
    # as the documented sbatch line passes them: strings on the command line
    train.main(["-c", str(ROOT / "configs/lvm_3b.yaml"), "--trainer.num_nodes", "4", "--trainer.devices", "8"])
    assert "; 2,097,152 on 32 devices" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp2_trains_on_one_gpu_in_bf16(shards):
    # CPU counterpart: tests/test_sharded.py (2 gloo ranks, float32).
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    module = LVMModule(overrides=MINI, warmup_steps=1, activation_checkpointing=True)
    strategy = ModelParallelStrategy(save_distributed_checkpoint=False)
    quick_trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", gradient_clip_val=1.0).fit(module, dm)
    weights = list(module.model.parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in weights)  # fp32 master shards
    assert all(torch.isfinite(p.full_tensor()).all() for p in weights)


class NaNAtBatch4(LVMModule):
    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * float("nan") if self.trainer.fit_loop.epoch_loop.batch_idx == 4 else loss


def test_a_nonfinite_loss_is_checked_once_per_optimizer_step_in_any_of_its_micro_batches(shards, monkeypatch):
    """Checked per micro-batch, every micro-batch made two collectives and stalled the GPU on the host; one per step
    must still catch a NaN in the first micro-batch of an accumulated step and name that batch."""
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    trainer = quick_trainer(max_steps=6, accumulate_grad_batches=3)
    calls = []
    reduce = trainer.strategy.reduce
    ours = lambda: any(frame.filename.endswith("lvm/train.py") for frame in traceback.extract_stack())  # noqa: E731
    monkeypatch.setattr(trainer.strategy, "reduce", lambda *a, **k: calls.append(ours()) or reduce(*a, **k))
    trainer.fit(LVMModule(overrides=MINI, warmup_steps=1), dm)
    assert calls.count(True) == 6  # the module's: one per optimizer step, none per micro-batch
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 2 \(batch 4 of epoch 0\)"):
        quick_trainer(max_steps=6, accumulate_grad_batches=2).fit(NaNAtBatch4(overrides=MINI, warmup_steps=1), dm)
    dm = LVMDataModule(str(shards), seq_len=32, batch_size=2, num_workers=0)
    module, snapshots = NaNAtBatch4(overrides=MINI, warmup_steps=1, on_nonfinite_loss="skip"), Snapshots()
    quick_trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[snapshots]).fit(module, dm)
    assert module.skipped_batches == 1
    # batches 4 and 5 make step 2 (global_step 2 -> 3): no update; the steps around it moved the weights
    assert all(torch.equal(a, b) for a, b in zip(snapshots.after[2], snapshots.after[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots.after[3], snapshots.after[4]))
