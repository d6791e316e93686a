"""LVMModule: next-token training of the LVM on Lightning. The defaults are the release's recipe in shape (AdamW
0.9/0.95, weight decay 0.1, clipping 1.0, warmup then cosine decay) with a smaller model's numbers (lr 3e-4 -> 3e-5,
2000 warmup steps, norms and embedding not decayed); configs/lvm_3b.yaml sets the release's lr and warmup
(docs/training.md says where each config departs from the release and why).

    lightning fit -c configs/lvm_300m.yaml           # train (see docs/training.md)
    python -m lvm.train -c configs/lvm_3b.yaml       # dry run: parse the config, report the run's size

The network is built and parallelized in `configure_model()` (`lvm.parallelize`: activation checkpointing,
torch.compile, and FSDP2 under Lightning's ModelParallelStrategy); the module itself only holds the
`LVMConfig`, which is why constructing it for a 3B config is instant. Checkpoints keep the network at
`model.*` and the shape at `checkpoint["lvm_config"]`, which is all `lvm.checkpoint.load_lvm` needs to
rebuild the model without Lightning.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from common.errors import check_settings
from lvm.callbacks import align_log_steps
from lvm.cli import ConciseParser, SeedCheckedCLI, config_errors_as_one_line, requested_devices
from lvm.data import check_data_settings
from lvm.errors import ConfigError, NonFiniteLossError
from lvm.model import LVM, SIZES, LVMConfig
from lvm.parallelize import parallelize

SizeName = Literal[tuple(SIZES)]  # the CLI rejects an unknown size with the list of choices


Schedule = Literal["cosine", "wsd", "constant"]
DecayShape = Literal["linear", "1-sqrt"]


def lr_multiplier(
    step: int,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float,
    schedule: Schedule = "cosine",
    decay_fraction: float = 0.2,
    decay_shape: DecayShape = "1-sqrt",
) -> float:
    """LR multiplier at optimizer step `step`: linear warmup to 1 over `warmup_steps`, then
    - cosine: cosine decay to `min_ratio` at `max_steps` (the paper's recipe);
    - wsd: warmup-stable-decay, 1 until the last `decay_fraction` of `max_steps`, then `decay_shape` down
      to `min_ratio` (MiniCPM/DeepSeek): the stable phase keeps the learning rate up while slow-forming
      abilities (such as reading context) develop, and a finished run can be extended from a stable-phase
      checkpoint;
    - constant: 1 after warmup (`min_ratio` unused).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max(warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    remaining = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return min_ratio + (1.0 - min_ratio) * remaining


class LVMModule(L.LightningModule):
    """Trains an LVM of a named size by next-token prediction on packed visual sentences.

    Args:
        size: one of the paper's sizes (300m, 600m, 1b, 3b), the released 7b, or tiny (CPU).
        overrides: LVMConfig fields to change from the named size, e.g. `{max_seq_len: 1024, dropout: 0.1}`.
        lr: peak learning rate (after warmup).
        min_lr: learning rate at the end of the decay (`trainer.max_steps`); unused by `constant`.
        warmup_steps: optimizer steps of linear warmup from ~0 to `lr`.
        schedule: after warmup, `cosine` decay over the whole run (the paper's recipe, the default), `wsd`
            (constant, then a decay over the last `decay_fraction` of the steps) or `constant`; see
            `lr_multiplier` and docs/training.md for when to use which.
        decay_fraction: `wsd` only: the fraction of `trainer.max_steps` spent decaying.
        decay_shape: `wsd` only: `1-sqrt` (MiniCPM's, usually a little better) or `linear`.
        betas, eps, weight_decay: AdamW's.
        decay_norms_and_embeddings: also decay RMSNorm weights and the token embedding (the release
            decayed every parameter; the default exempts them, as most LLaMA-style recipes do).
        compile: `torch.compile` each transformer block (keeps state-dict keys unchanged).
        activation_checkpointing: recompute each transformer block in the backward pass (less activation
            memory, ~1/3 more compute, the same numbers).
        on_nonfinite_loss: `stop` raises at the first NaN/Inf loss, naming the step; `skip` drops the
            optimizer step holding that batch (no update; the backward still runs on every rank, as DDP and
            FSDP2 need matching collectives) and counts the batch in `train/skipped_batches`.
    """

    def __init__(
        self,
        size: SizeName = "tiny",
        overrides: dict[str, Any] | None = None,
        lr: float = 3e-4,
        min_lr: float = 3e-5,
        warmup_steps: int = 2000,
        schedule: Schedule = "cosine",
        decay_fraction: float = 0.2,
        decay_shape: DecayShape = "1-sqrt",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_norms_and_embeddings: bool = False,
        compile: bool = False,
        activation_checkpointing: bool = False,
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = _lvm_config(size, overrides or {})
        check_settings("model", (
            ("lr", lr, lr > 0, "must be > 0"),
            ("min_lr", min_lr, 0 <= min_lr <= lr, f"must be in [0, lr={lr}]"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, "must be >= 0"),
            ("schedule", schedule, schedule in ("cosine", "wsd", "constant"), "must be 'cosine', 'wsd' or 'constant'"),
            ("decay_fraction", decay_fraction, 0 < decay_fraction <= 1, "must be in (0, 1]"),
            ("decay_shape", decay_shape, decay_shape in ("linear", "1-sqrt"), "must be 'linear' or '1-sqrt'"),
            ("betas", self.hparams.betas, all(0 <= b < 1 for b in betas), "must be in [0, 1)"),
            ("eps", eps, eps > 0, "must be > 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, "must be >= 0"),
            ("on_nonfinite_loss", on_nonfinite_loss, on_nonfinite_loss in ("stop", "skip"), "must be 'stop' or 'skip'"),
        ), ConfigError)
        self.model: LVM | None = None
        self.flops_per_batch = 0.0  # read by ThroughputMonitor for tokens/s and MFU
        self.skipped_batches = 0
        self._drop_step = False  # set by a non-finite loss under `skip`: the next optimizer step makes no update
        # (batch index, loss) of this optimizer step's micro-batches so far on this rank, checked and logged per step.
        self._step_losses: list[tuple[int, torch.Tensor]] = []
        self._val_losses: list[torch.Tensor] = []  # this validation epoch's batch losses, for val/ppl
        rank_zero_info(
            f"LVM {size}: {self.cfg.num_params():,} parameters, "
            f"{self.cfg.flops_per_token() / 1e9:.3g} GFLOP per training token at seq {self.cfg.max_seq_len}"
        )

    # -- construction ---------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Cross-checks with the trainer and data, before the network is built or any data is read."""
        trainer = self.trainer
        if stage == "fit":
            check_fit(self.hparams.warmup_steps, trainer.max_steps, trainer.limit_train_batches,
                      trainer.accumulate_grad_batches, trainer.gradient_clip_algorithm)
        check_seq_len(getattr(trainer.datamodule, "seq_len", None), self.cfg)

    def configure_model(self) -> None:
        if self.model is not None:  # already built (a second fit, or a model loaded by the user)
            return
        # Lightning's ModelParallelStrategy sets a device mesh: shard over it with FSDP2. On GPUs the model is
        # built on the meta device and each rank initialises only its shards (each layer's reset_parameters;
        # DTensor's CUDA RNG draws them as the whole tensor would be drawn), so no rank holds the full fp32
        # model. CPU ranks lack that RNG: they build the whole model, seeded alike, and keep their shards.
        mesh = self.device_mesh
        with torch.device("meta") if mesh is not None and mesh.device_type != "cpu" else nullcontext():
            model = LVM(self.cfg)
        bf16 = self._trainer is not None and str(self.trainer.precision).startswith("bf16")
        self.model = parallelize(
            model,
            mesh,
            activation_checkpointing=self.hparams.activation_checkpointing,
            compile=self.hparams.compile,
            param_dtype=torch.bfloat16 if bf16 else None,
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume must train the model it saved: another shape, or weight decay over other parameter groups, would
        stop with a 20-60 line traceback from the state dict or AdamW's group sizes. (Under FSDP2 Lightning restores
        the model and optimizer before this hook, and its own error comes first.)"""
        saved = checkpoint.get("lvm_config")
        if saved is None:  # a tokenizer's checkpoint (which records no class to refuse it by): 23 KB of missing keys
            raise ConfigError("--ckpt_path: the checkpoint holds no LVM (no lvm_config): it was saved by another kind "
                              "of model; give an LVM training checkpoint")
        if saved:
            shape = {key: (value, getattr(self.cfg, key)) for key, value in saved.items() if hasattr(self.cfg, key)
                     and key not in ("dropout", "init_std") and value != getattr(self.cfg, key)}  # those two may change
            if shape:
                what = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in shape.items())
                raise ConfigError(f"model.size / model.overrides: the checkpoint's model has {what}; resume with its shape")
        decay = checkpoint.get("hyper_parameters", {}).get("decay_norms_and_embeddings")
        if decay is not None and decay != self.hparams.decay_norms_and_embeddings:
            raise ConfigError(f"model.decay_norms_and_embeddings: the checkpoint was trained with {decay}; resume with it")
        self.skipped_batches = checkpoint.get("skipped_batches", 0)  # train/skipped_batches counts on

    def _apply_optimizer_settings(self) -> None:
        """The optimizer's settings are this run's, as the schedule's are: AdamW's restored groups bring back the old
        lr, weight decay, betas and eps, and a resume "at a lower model.lr" (the NaN stop's advice) would not be one.
        Run when training starts, after every strategy has restored the optimizer (a fresh run changes nothing)."""
        hp = self.hparams
        lr = hp.lr * self._schedule()(self.trainer.global_step)
        for optimizer in self.trainer.optimizers:
            for group, weight_decay in zip(optimizer.param_groups, (hp.weight_decay, 0.0)):
                group.update(lr=lr, initial_lr=hp.lr, weight_decay=weight_decay, betas=tuple(hp.betas), eps=hp.eps)
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [hp.lr] * len(config.scheduler.base_lrs)
            config.scheduler._last_lr = [lr] * len(config.scheduler.base_lrs)  # what LearningRateMonitor reads

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lvm_config"] = self.cfg.to_dict()
        checkpoint["skipped_batches"] = self.skipped_batches  # train/skipped_batches counts on after a resume
        # The tokenizer behind the training sentences (None if unrecorded), so readers can check theirs.
        checkpoint["tokenizer"] = getattr(self.trainer.datamodule, "tokenizer", None)

    def on_train_start(self) -> None:
        self._step_losses = []  # a fit stopped inside an accumulation (a second Ctrl-C) leaves some behind
        self._apply_optimizer_settings()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        align_log_steps(self.trainer)

    # -- steps ----------------------------------------------------------------------------------------------

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch["input_ids"]
        self.flops_per_batch = self.cfg.flops_per_token(tokens.shape[1]) * tokens.numel()
        loss = self._loss(batch)
        # Checked once per optimizer step (on_before_optimizer_step): a check here would stall the GPU on every
        # micro-batch. A non-finite loss still goes to backward, as Lightning refuses a skipped training_step with
        # several ranks and DDP/FSDP2 need the same collectives on every rank; its step makes no update.
        self._step_losses.append((batch_idx, loss.detach()))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_end(self) -> None:
        """val/ppl: exp of the mean loss over the epoch's batches and ranks, as train/ppl is exp of its loss. A mean
        of per-batch exp (what logging it per batch gives) exceeds it (Jensen), by more the more the batches differ."""
        if self._val_losses:
            mean = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
            self.log("val/ppl", mean.exp())
        self._val_losses = []

    # -- optimisation ---------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        decay, no_decay, seen = [], [], set()
        for module in self.model.modules():
            exempt = isinstance(module, (nn.RMSNorm, nn.Embedding)) and not hp.decay_norms_and_embeddings
            for param in module.parameters(recurse=False):
                if id(param) not in seen:  # a tied head shares the embedding's tensor and its group
                    seen.add(id(param))
                    (no_decay if exempt else decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (CPU and GPU) updates all parameters in one pass instead of a loop over tensors.
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=True)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, self._schedule()), "interval": "step"}}

    def _schedule(self) -> Callable[[int], float]:
        """The learning-rate multiplier by step, from this run's settings."""
        hp = self.hparams
        return partial(
            lr_multiplier, warmup_steps=hp.warmup_steps, max_steps=self.trainer.max_steps, min_ratio=hp.min_lr / hp.lr,
            schedule=hp.schedule, decay_fraction=hp.decay_fraction, decay_shape=hp.decay_shape,
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the loss of the optimizer step about to be taken, and stop or drop the step if a loss was not finite.

        The loss is the mean over the step's micro-batches and the ranks (equal token counts); logged per
        micro-batch, Lightning would keep only the last one's. One collective and one host sync per step decide, on
        every rank together, whether any rank's loss was not finite; configure_gradient_clipping (next) then drops
        the update under `skip`.
        """
        batches, losses = zip(*self._step_losses)
        self._step_losses = []
        local = torch.stack(losses)
        finite = torch.isfinite(local)
        totals = torch.stack([local.sum(), (~finite).any().to(local.dtype)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss = totals[0] / (len(losses) * self.trainer.world_size)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.exp())
        if (bad := int(totals[1].item())) == 0:
            return
        if self.hparams.on_nonfinite_loss == "stop":
            first = int((~finite).nonzero()[0]) if not finite.all() else 0
            here, batch = local[first].item(), batches[first]
            world = self.trainer.world_size
            what = here if world == 1 else f"non-finite on {bad} of {world} ranks (this rank: {here})"
            # a fresh run that has saved nothing yet has no checkpoint to go back to: only a new start helps
            earlier = self.trainer.ckpt_path or any(callback.best_model_path or callback.last_model_path
                                                    for callback in self.trainer.checkpoint_callbacks)
            lower = ("resume from the checkpoint before this stop's (its weights gave it) with a lower model.lr" if earlier
                     else "no checkpoint comes before this stop's (its weights gave it): start anew with a lower model.lr "
                          "in another folder (move this run's away)")
            raise NonFiniteLossError(f"loss is {what} at step {self.global_step} (batch {batch} of epoch "
                                     f"{self.current_epoch}); {lower}, or set model.on_nonfinite_loss=skip to drop such batches")
        self._drop_step = True
        self.skipped_batches += 1
        self.log("train/skipped_batches", float(self.skipped_batches))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm (`trainer.gradient_clip_val`) and log that norm every step.

        Replaces Lightning's clipping, which does not return the norm. Under FSDP2 the gradients are DTensor
        shards; torch's clipping reduces their norm over all ranks. Runs after the backward passes of an
        optimizer step and before the update, so it is also where a step with a non-finite loss (`skip`) is
        dropped: without gradients AdamW leaves every parameter and its moments as they are.
        """
        if not self._drop_step:
            # The global norm (DTensor shards reduce over ranks, DDP's gradients are alike): every rank agrees.
            norm = nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
            full = norm.full_tensor() if isinstance(norm, DTensor) else norm
            self.log("train/grad_norm", full)
            if torch.isfinite(full).item():
                # None or <= 0: no clipping, as in Lightning (torch would zero or negate every gradient)
                max_norm = float(gradient_clip_val) if gradient_clip_val and gradient_clip_val > 0 else float("inf")
                nn.utils.clip_grads_with_norm_(self.parameters(), max_norm, norm)
                return
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                return  # fp16's loss scaler: overflows are its signal to skip this step and lower the scale
            # A finite loss with an overflow in the backward: clipped, it would write NaN into every weight it reaches.
            if self.hparams.on_nonfinite_loss == "stop":
                raise NonFiniteLossError(
                    f"gradient norm is {full.item()} at step {self.global_step} (the loss was finite); resume from the "
                    "checkpoint before this stop's (its weights gave it) with a lower model.lr, or set "
                    "model.on_nonfinite_loss=skip to drop such steps"
                )
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
        self._drop_step = False
        for param in self.parameters():
            param.grad = None


def check_fit(warmup_steps: int, max_steps: int | None, limit_train_batches: float | int | None,
              accumulate_grad_batches: int, gradient_clip_algorithm: str | None) -> None:
    """The trainer settings a fit needs, checked by `LVMModule.setup` and by the dry run alike."""
    if max_steps is None or max_steps <= 0:
        raise ConfigError("trainer.max_steps: must be set (> 0); the learning-rate schedule decays over it")
    if warmup_steps >= max_steps:
        raise ConfigError(f"model.warmup_steps: {warmup_steps} must be below trainer.max_steps ({max_steps})")
    if limit_train_batches is not None and (isinstance(limit_train_batches, int) or limit_train_batches != 1.0):
        raise ConfigError(f"trainer.limit_train_batches: {limit_train_batches} is not supported: each Lightning epoch "
                          "would end early and the stream start a new shuffle, so most of the data would never be read; "
                          "bound the run with trainer.max_steps")
    if accumulate_grad_batches < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches: must be >= 1, got {accumulate_grad_batches}")
    if gradient_clip_algorithm not in (None, "norm"):
        raise ConfigError("trainer.gradient_clip_algorithm: only 'norm' (global norm clipping) is supported")


def check_seq_len(seq_len: int | None, cfg: LVMConfig) -> None:
    """Rows longer than the model's context have no positions for their tail: refused when the config is built."""
    if seq_len is not None and seq_len > cfg.max_seq_len:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's context (max_seq_len {cfg.max_seq_len})")


def _describe_schedule(hp) -> str:
    if hp.schedule == "wsd":
        return f"wsd, {hp.decay_shape} decay over the last {hp.decay_fraction:g}"
    return hp.schedule


def _lvm_config(size: str, overrides: dict[str, Any]) -> LVMConfig:
    known = {f.name for f in fields(LVMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model.overrides: unknown LVMConfig field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return LVMConfig.from_name(size, **overrides)
    except ValueError as e:
        raise ConfigError(f"model.{'size' if 'unknown LVM size' in str(e) else 'overrides'}: {e}") from None


class _DryRunCLI(SeedCheckedCLI):
    """Parses a config exactly as `lightning fit` does, then builds only the LightningModule, which holds
    the model's shape but no weights: no Trainer, device, or data is touched."""

    def instantiate_classes(self) -> None:
        module, _, name = self.config["model"].class_path.rpartition(".")
        model_class = getattr(importlib.import_module(module), name)
        # The summary reads an LVM's shape and schedule. By its importable name: run as `python -m lvm.train`, this
        # file's own LVMModule is __main__'s, another class than the config's lvm.train.LVMModule.
        if not issubclass(model_class, importlib.import_module("lvm.train").LVMModule):
            raise ConfigError(f"model: python -m lvm.train summarises LVM configs (lvm.train.LVMModule); this one trains "
                              f"{self.config['model'].class_path}: run it with lightning fit")
        self.model = model_class(**self.config["model"].init_args.as_dict())


def summary(cli: LightningCLI) -> str:
    """What a config trains: model shape, parameters, FLOPs and tokens per optimizer step, schedule, strategy."""
    model, cfg = cli.model, cli.model.cfg
    trainer, data = cli.config["trainer"], cli.config["data"].init_args
    hp = model.hparams
    devices = requested_devices(trainer.devices)  # `--trainer.devices 8` on the command line arrives as a string
    per_device = data.batch_size * data.seq_len * trainer.accumulate_grad_batches
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else trainer.strategy.class_path.rpartition(".")[2]
    lines = [
        f"model      {hp.size}: dim {cfg.dim}, mlp {cfg.mlp_dim}, layers {cfg.n_layers}, heads {cfg.n_heads}, "
        f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}",
        f"parameters {cfg.num_params():,} ({cfg.num_params() / 1e9:.3f} B)",
        f"flops      {cfg.flops_per_token(data.seq_len) / 1e9:.2f} GFLOP per training token at seq {data.seq_len}",
        f"tokens     {per_device:,} per optimizer step per device (batch {data.batch_size} x seq {data.seq_len} x "
        f"accumulation {trainer.accumulate_grad_batches})"
        + (f"; {per_device * devices * trainer.num_nodes:,} on {devices * trainer.num_nodes} devices" if devices else ""),
        f"schedule   AdamW lr {hp.lr:g}{'' if hp.schedule == 'constant' else f' -> {hp.min_lr:g}'} ({_describe_schedule(hp)}), warmup {hp.warmup_steps}, {trainer.max_steps} steps, "
        f"weight decay {hp.weight_decay:g} ({'all parameters' if hp.decay_norms_and_embeddings else 'matrices; norms and embedding 0'}), "
        f"clip {trainer.gradient_clip_val}",
        f"trainer    {strategy}, precision {trainer.precision}, {trainer.num_nodes} node(s) x {trainer.devices} device(s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m lvm.train -c CONFIG [--model.size 1b ...]`: print the summary of a training config."""
    with config_errors_as_one_line():
        cli = _DryRunCLI(parser_class=ConciseParser, subclass_mode_model=True, subclass_mode_data=True, run=False, args=argv,
                         auto_configure_optimizers=False,
                         parser_kwargs={"prog": "python -m lvm.train"})
        trainer = cli.config["trainer"]  # what `lightning fit` would refuse, refused here too
        check_fit(cli.model.hparams.warmup_steps, trainer.max_steps, trainer.limit_train_batches,
                  trainer.accumulate_grad_batches, trainer.gradient_clip_algorithm)
        data = cli.config["data"].init_args
        check_data_settings(data.seq_len, data.batch_size, data.num_workers, data.seed)
        check_seq_len(data.seq_len, cli.model.cfg)
    print(summary(cli))


if __name__ == "__main__":
    main()
