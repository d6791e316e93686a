"""Lightning plug-ins for LVM training runs: throughput/MFU, preemption, atomic checkpoints, image samples.

All are named by `class_path` in configs/lvm_*.yaml (see docs/training.md).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ThroughputMonitor

import weights
from common.files import atomic_write
from common.vocab import BOS_ID
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
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's setup, then the peak of `lvm.peaks` instead of Lightning's table (which counts some
        cards with sparsity and lacks the H200), so that the log and the benchmarks agree on every card."""
        super().setup(trainer, pl_module, stage)
        half = str(trainer.precision).startswith(("bf16", "16"))
        self.available_flops = dense_bf16_peak(trainer.strategy.root_device) if half else None
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops


class StopOnSigterm(Callback):
    """Turns SIGTERM (preemption, `scancel`, a job time limit) into a resumable stop after the current
    optimizer step.

    Lightning's own handler stops after whichever micro-batch is running, also inside a gradient accumulation:
    the checkpoint then counts micro-batches as consumed whose gradients it does not hold, and `--ckpt_path last`
    would skip them. While training, this callback holds SIGTERM instead (forwarding it to the processes
    Lightning launched, as Lightning's handler does), and once an optimizer step is complete and any rank got
    it, sets Lightning's SIGTERM flag on every rank; Lightning then raises its `SIGTERMException` after this
    step's logs, and `ModelCheckpoint(save_on_exception=True)` writes a checkpoint that resumes exactly.
    """

    def __init__(self) -> None:
        self._step_at_start = 0
        self._pending = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hold(signum: int, frame: Any) -> None:
            if not self._pending and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)
            self._pending = True

        self._previous_handler = signal.signal(signal.SIGTERM, hold)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        stepped = trainer.global_step > self._step_at_start
        if stepped and trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            # Lightning's flag (private: there is no public setter): it stops after logging this step.
            trainer._signal_connector.received_sigterm = True


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
        self.tokenizer_path, self.every_n_steps, self.context_images = tokenizer, every_n_steps, context_images
        self.sampling = Sampling(temperature=temperature, top_k=top_k)
        self._tokenizer = None
        self._last_step = -1

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
        if self._tokenizer is None:
            import tokenizer  # only runs that sample need the VQGAN

            self._tokenizer = tokenizer.load(self.tokenizer_path)
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
