"""Lightning plug-ins for LVM training runs: throughput/MFU, preemption, atomic checkpoints, image samples.

All are named by `class_path` in configs/lvm_*.yaml (see docs/training.md).
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

import weights
from common.errors import UserError
from common.files import atomic_write
from common.progress import clock
from common.vocab import BOS_ID
from lvm.checkpoint import describe, tokenizer_mismatch
from lvm.errors import ConfigError
from lvm.generate import Decoder, Sampling
from lvm.parallelize import gather
from lvm.peaks import dense_bf16_peak


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token batches, averaged over the last `window_size` batches.

    Logs `train/device/items_per_sec` (tokens/s per device; `train/items_per_sec` over all devices when
    there are several), `train/device/flops_per_sec` and, in bf16/fp16 on the GPUs of `lvm.peaks`,
    `train/device/mfu`: FLOPs from `LVMConfig.flops_per_token` (6N + attention) against the card's dense peak.
    """

    def __init__(self, window_size: int = 20) -> None:
        if window_size < 2:  # Lightning asserts it, with no message, when training starts
            raise ConfigError(f"TokenThroughput.window_size: must be >= 2 (a rate needs two batches), got {window_size}")
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's setup, then the peak of `lvm.peaks` instead of Lightning's table (which counts some
        cards with sparsity and lacks the H200), so that the log and the benchmarks agree on every card."""
        super().setup(trainer, pl_module, stage)
        half = str(trainer.precision).startswith(("bf16", "16"))
        self.available_flops = dense_bf16_peak(trainer.strategy.root_device) if half else None
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops


class StopOnSignal(Callback):
    """Turns SIGTERM (preemption, `scancel`, a job time limit) and Ctrl-C into a resumable stop after the current
    optimizer step; a second Ctrl-C stops at once.

    Lightning's own handling stops inside the step that is running, also inside a gradient accumulation: the
    checkpoint then holds a step whose micro-batches were partly trained, which no resume repeats exactly. While
    training, this callback holds both signals instead (forwarding SIGTERM to the processes Lightning launched, as
    Lightning's handler does; a terminal's Ctrl-C reaches them all by itself), and once an optimizer step is
    complete and any rank got one, sets Lightning's SIGTERM flag on every rank; Lightning then raises its
    `SIGTERMException` after this step's logs, `ModelCheckpoint(save_on_exception=True)` writes a checkpoint that
    resumes exactly, and `lightning fit` exits with 128 + the signal's number (`received`).
    """

    received: int | None = None
    """The signal that stopped training in this process, if any (read by `lvm.cli.main` for the exit status)."""

    def __init__(self) -> None:
        self._step_at_start = 0
        self._pending = False
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hold(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._pending:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now (Lightning saves what it has)
            if signum == signal.SIGTERM and not self._pending and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            if not self._pending and trainer.is_global_zero:
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                print(f"{name}: stopping after this optimizer step with a checkpoint (Ctrl-C again: at once)",
                      file=sys.stderr)
            self._pending, StopOnSignal.received = True, signum

        self._previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # Only a safety net: on every way out of `fit`, Lightning's teardown comes after these hooks and puts back the
    # handlers it found before `fit` anyway. `_previous` holds Lightning's own handlers (installed before training
    # starts), so a restore moved after that teardown would leave them in place, swallowing SIGTERM for the rest of
    # a process that trains in-process.
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        stepped = trainer.global_step > self._step_at_start
        # A signal in the last step needs no stop: the run is complete, and it ends as a finished one (exit 0).
        unfinished = trainer.max_steps < 0 or trainer.global_step < trainer.max_steps
        if stepped and unfinished and trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            # Lightning's flag (private: there is no public setter): it stops after logging this step.
            trainer._signal_connector.received_sigterm = True


def align_log_steps(trainer: L.Trainer) -> None:
    """Lightning labels logged metrics with its own counter of stepped batches. After a resume from a checkpoint saved
    inside a step (a second Ctrl-C, an error) or on an epoch's last batch, its restore adds one too many, and the
    resumed log runs one step ahead of the optimizer steps it describes. With one optimizer the two counters are the
    same thing (Lightning's checkpoint migration equates them too). Called before anything logs in a batch: by the
    module's batch hook, and by `LearningRateMonitor`, whose hook runs before the module's."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging once per optimizer step: under gradient accumulation Lightning's wrote
    each rate once per micro-batch of a logged step (4 identical rows in metrics.csv at accumulation 4); and under
    the step the rate belongs to after a resume (`align_log_steps`)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the step's first micro-batch
            align_log_steps(trainer)
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


# A resume writes into the folder of its run's checkpoints, which Lightning warns about at every start; a fresh start
# into such a folder is refused before that (`lvm.cli.check_start`), so the warning only ever told of a resume.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also saves the final step. Lightning's writes `last.ckpt` at the end of
    training only if it saved nothing before: a 650-step run with a checkpoint every 100 steps ended with
    `last.ckpt` at step 600, the last 50 steps lost to every later user of it. The same holds for checkpoints
    that follow validation (no `every_n_train_steps`: Lightning's `every_n_epochs=1`, as in
    lvm/demo/configs/vqgan.yaml): the steps after the last validation were lost."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """The stop's checkpoint (SIGTERM, Ctrl-C, a NaN stop) joins the `save_top_k` rotation: Lightning writes it
        outside, so a paper-size config keeping the 3 newest kept every preemption's checkpoint for good (39 GB
        each at 3b). Lightning's line for it ("An SIGTERMException was raised with message: , ...") read like a
        crash after a plain stop."""
        if not self._should_save_on_exception(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        if self._last_global_step_saved != trainer.global_step:  # not among the top k of a monitored metric: kept
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))  # outside, as Lightning keeps it
        self._save_last_checkpoint(trainer, candidates)
        rank_zero_info(f"stopping ({type(exception).__name__}): saved a checkpoint of step {trainer.global_step} in {self.dirpath}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        periodic = self._every_n_train_steps or self._every_n_epochs
        if periodic and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)  # as Lightning's own periodic save does
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class TrainingProgress(Callback):
    """Plain progress lines for runs whose logs are files (the configs turn Lightning's redrawn bar off): on rank 0,
    at most every `every_s` seconds, `step N/M (p%) | loss L | s/step | ETA H:MM:SS`, and at the end one summary
    line with the steps of this run, its wall time, the last loss, the checkpoint folder and, for data that can hold
    unreadable images (the tokenizer's), how many were skipped on all devices."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._start = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def _loss(self, trainer: L.Trainer) -> str:
        loss = trainer.callback_metrics.get("train/loss")
        return f"{float(loss):.4f}" if loss is not None else "?"

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        now = time.monotonic()
        if not trainer.is_global_zero or now - self._last < self.every_s:
            return
        self._last = now
        done, total = trainer.global_step, trainer.max_steps
        per_step = (now - self._start) / max(done - self._first_step, 1)
        eta = clock(per_step * (total - done)) if total and total > 0 else "?"
        share = f" ({100 * done / total:.1f}%)" if total and total > 0 else ""
        print(f"step {done:,}/{total:,}{share} | loss {self._loss(trainer)} | {per_step:.2f} s/step | ETA {eta}",
              file=sys.stderr, flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resume of a finished run trains nothing (Lightning skips its loop, and this callback's summary) after a
        line that says it is resuming: say why."""
        if trainer.is_global_zero and not self._start and 0 < trainer.max_steps <= trainer.global_step:
            print(f"nothing to train: the checkpoint is at step {trainer.global_step:,} >= trainer.max_steps "
                  f"{trainer.max_steps:,}; raise "
                  "--trainer.max_steps to continue (a wsd schedule extends: docs/training.md)", file=sys.stderr, flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unreadable = getattr(trainer.datamodule, "unreadable", None)  # tokenizer.data.UnreadableCount, where counted
        skipped = ""
        if unreadable is not None:  # a sum over ranks: every rank takes part
            count = int(trainer.strategy.reduce(torch.tensor(unreadable.value, device=pl_module.device), reduce_op="sum"))
            skipped = f"; {count:,} unreadable input{'s' * (count != 1)} skipped (warned above)" if count else \
                "; no unreadable inputs"
        if not trainer.is_global_zero:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)  # its final save comes after this line
        print(f"trained steps {self._first_step:,}..{trainer.global_step:,} in {clock(time.monotonic() - self._start)}; "
              f"last loss {self._loss(trainer)}; checkpoints in {folder or 'none'}{skipped}", file=sys.stderr, flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint with `common.files.atomic_write`: `<path>.tmp` beside the target, fsynced, then
    renamed over the target; reads checkpoints back with `weights_only=True` (`weights.torch_load`) when a
    run resumes.

    A kill during the write leaves the previous checkpoint untouched. Lightning's default serialises the
    whole checkpoint into memory first and stages it in the system temp directory, which doubles host
    memory for multi-GB checkpoints and is not atomic when that directory is on another filesystem.
    Remote paths (`s3://...`) keep Lightning's default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """`--ckpt_path` reads the checkpoint as data (`weights_only=True`): one that pickles code is refused."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return weights.torch_load(path, map_location=map_location)


class SampleImages(Callback):
    """Every `every_n_steps` optimizer steps, continues a sentence of the current batch by one image and
    writes `[context images | sampled image | true image]` as a PNG under `<log dir>/samples/`.

    Does nothing without a `tokenizer` (anything `tokenizer.load` accepts). Runs on rank 0 with the
    model's KV cache (lvm.generate); under FSDP2 the shards are first gathered into a full copy on rank 0
    (a collective, so every rank takes part), which samples and is then freed.

    Args:
        tokenizer: tokenizer checkpoint or directory used to decode the tokens to pixels.
        every_n_steps: optimizer steps between samples.
        context_images: images of the sentence given as the prompt (after its BOS).
        temperature, top_k: the sampling rule (lvm.generate.Sampling).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        every_n_steps: int = 1000,
        context_images: int = 1,
        temperature: float = 1.0,
        top_k: int | None = 50,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("context_images", context_images)):
            if value < 1:
                raise ConfigError(f"SampleImages.{name}: must be >= 1, got {value}")
        self.tokenizer_path, self.every_n_steps, self.context_images = tokenizer, every_n_steps, context_images
        self.sampling = Sampling(temperature=temperature, top_k=top_k)
        self._tokenizer = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the tokenizer before the first step: a wrong path would otherwise stop the run at its first sample,
        thousands of steps in."""
        if self.tokenizer_path is not None and self._tokenizer is None and trainer.is_global_zero:
            import tokenizer  # only runs that sample need the VQGAN

            try:
                self._tokenizer = tokenizer.load(self.tokenizer_path)
            except UserError as error:  # named by the option, as its other checks are
                raise ConfigError(f"SampleImages.tokenizer: {error}") from None
            # Another tokenizer than the one that made the sentences cut their images wrong (other tokens per image)
            # and decoded noise, or found no sentence within its codebook and wrote nothing, without a word.
            made, given = getattr(trainer.datamodule, "tokenizer", None), self._tokenizer.identity(self.tokenizer_path)
            if tokenizer_mismatch(made, given):
                raise ConfigError(f"SampleImages.tokenizer: {describe(given)} is not the tokenizer that made the "
                                  f"training sentences, {describe(made)}: give that one, or drop the callback")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int) -> None:
        step = trainer.global_step
        if self.tokenizer_path is None or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        # Both are collectives, so every rank takes part: gathering FSDP2 shards, and trainer.log_dir (a broadcast).
        model = gather(pl_module.model, pl_module.device)
        out = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{step:08d}.png"
        if not trainer.is_global_zero:
            return
        images = self.sample(model, batch["input_ids"][0], trainer.precision_plugin.forward_context())
        if images is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_png(torchvision.utils.make_grid(images, nrow=len(images)), str(out))

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, row: torch.Tensor, autocast: Any) -> torch.Tensor | None:
        """Decoded images uint8 [context_images + 2, 3, S, S] for the first sentence of `row` that holds
        BOS + context + one more image, or None if the row has none."""
        n, num_codes = self._tokenizer.tokens_per_image, self._tokenizer.codebook_size
        need = 1 + (self.context_images + 1) * n
        starts = [
            int(p) for p in (row == BOS_ID).nonzero().flatten()
            if p + need <= len(row) and bool((row[p + 1 : p + need] < num_codes).all())  # codes of one sentence only
        ]
        if not starts:
            return None
        sentence = row[starts[0] : starts[0] + need]
        prompt = sentence[: need - n][None]
        was_training = model.training
        model.eval()
        try:
            with autocast, Decoder(model, batch_size=1, max_len=need) as decoder:
                sampled = decoder.generate(prompt, n, self.sampling, num_codes=num_codes)
        finally:
            model.train(was_training)
        codes = torch.cat([sentence[1:].view(-1, n)[:-1], sampled, sentence[-n:][None]])
        return self._tokenizer.decode(codes.cpu()).cpu()
