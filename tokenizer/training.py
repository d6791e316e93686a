"""VQGAN training as a LightningModule: `lightning fit -c configs/vqgan_*.yaml`.

Generator objective: L1 or L2 reconstruction + LPIPS (when its weights are on disk)
+ VQ loss, and after `disc_start` steps a PatchGAN hinge loss scaled by taming's
adaptive weight (ratio of the reconstruction and GAN gradient norms at the
decoder's last layer). The discriminator is taming's `NLayerDiscriminator`.

Manual optimisation of generator and discriminator with ONE AdamW holding two
parameter groups and ONE backward pass per batch: the generator's GAN term sees the
discriminator's weights detached (`torch.func.functional_call`), the discriminator's
hinge loss sees detached images, so a single backward fills each group with exactly
its own gradients. Both groups step from the same forward (a simultaneous update: taming's
two optimizers let the discriminator see the generator after its step, one step later here), which keeps DDP's one
backward per forward, and Lightning counts one optimizer step per batch, so
`max_steps`, `disc_start` and logging intervals all count batches (with two
optimizers `global_step` would advance twice per batch once the GAN starts).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import Tensor
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel

from common.errors import UserError, check_settings
from tokenizer.config import VQGANConfig, VQGANConfigError
from tokenizer.evaluate import image_psnr
from tokenizer.loading import LIGHTNING_KEY
from tokenizer.lpips import LPIPS, load_lpips
from tokenizer.model import VQTokenizer
from tokenizer.preprocess import from_value_range, to_value_range
from tokenizer.quantizer import codebook_stats

# Checkpoints during manual optimization hold the state after the step, which is what a resume continues from;
# Lightning warns (12 lines, with code to paste into training_step) that they do not hold the state before it.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# A resume mid-epoch draws a new image order by design (the seed and the start step: tokenizer.data), which Lightning
# warns at every resume "can cause unreliable results".
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (taming's `hinge_d_loss`, whose module cannot be imported without `requests`)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def ema_with_warmup(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """`AveragedModel` update with decay min(decay, (1 + n) / (10 + n)) after n updates.

    torch's `get_ema_multi_avg_fn` uses a fixed decay, which keeps a short run's EMA
    close to the random initialisation; the warm-up (as in timm / LlamaGen) fixes that.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)

    return update


USAGE_DECAY = 0.99  # running usage averages over ~100 steps
DEAD_CODE_USAGE = 1e-3  # a code picked less than once per ~1000 steps is dead


class VQGANTraining(LightningModule):
    """Trains a `VQTokenizer`; batches are FloatTensor[B, 3, S, S] in [0, 1] (see `tokenizer.data`).

    Checkpoints carry the tokenizer config, so `tokenizer.load(path.ckpt)` reads them
    (EMA weights when `ema_decay` is set).
    """

    def __init__(
        self,
        tokenizer: VQGANConfig | None = None,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        reconstruction: Literal["l1", "l2"] = "l1",
        lpips_weight: float = 1.0,
        lpips_vgg16: str | None = None,
        lpips_linear: str | None = None,
        disc_start: int = 20000,
        disc_weight: float = 0.5,
        disc_channels: int = 64,
        disc_layers: int = 3,
        ema_decay: float | None = None,
        image_log_every_n_steps: int = 1000,
        restart_dead_codes: bool = False,
    ) -> None:
        super().__init__()
        check_settings("model", (
            ("learning_rate", learning_rate, learning_rate > 0, "must be > 0"),
            ("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "must be two numbers in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, "must be >= 0"),
            ("grad_clip", grad_clip, grad_clip is None or grad_clip > 0, "must be > 0 or null"),
            ("lpips_weight", lpips_weight, lpips_weight >= 0, "must be >= 0"),
            ("disc_start", disc_start, disc_start >= 0, "must be >= 0"),
            ("disc_weight", disc_weight, disc_weight >= 0, "must be >= 0"),
            ("disc_channels", disc_channels, disc_channels >= 1, "must be >= 1"),
            ("disc_layers", disc_layers, disc_layers >= 1, "must be >= 1"),
            ("ema_decay", ema_decay, ema_decay is None or 0 <= ema_decay < 1, "must be in [0, 1) or null"),
            ("image_log_every_n_steps", image_log_every_n_steps, image_log_every_n_steps >= 0, "must be >= 0 (0: none)"),
        ), VQGANConfigError)
        self.automatic_optimization = False
        self.config = tokenizer or VQGANConfig()
        if restart_dead_codes and self.config.fsq_levels:
            raise VQGANConfigError("VQGANTraining: restart_dead_codes needs a codebook; an fsq_levels tokenizer has none")
        self.learning_rate, self.betas, self.weight_decay, self.grad_clip = learning_rate, tuple(betas), weight_decay, grad_clip
        self.reconstruction = reconstruction
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.image_log_every_n_steps = image_log_every_n_steps
        self.tokenizer = VQTokenizer(self.config)
        self.discriminator = NLayerDiscriminator(self.config.in_channels, disc_channels, disc_layers).apply(weights_init)
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.tokenizer, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        # Held in a tuple, not as a submodule: frozen VGG weights do not belong in every checkpoint.
        lpips = load_lpips(lpips_vgg16, lpips_linear) if lpips_weight > 0 else None
        self._lpips: tuple[LPIPS, ...] = (lpips,) if lpips is not None else ()
        self.lpips_weight = lpips_weight
        self.register_buffer("_code_counts", torch.zeros(self.config.codebook_size, dtype=torch.long), persistent=False)
        # Running code usage (EMA of per-step counts) for `restart_dead_codes`: codes whose usage falls
        # below DEAD_CODE_USAGE are moved onto latents of the batch after the optimizer step.
        self.restart_dead_codes = restart_dead_codes
        # Starting at zero makes the first step a data-dependent codebook init. Saved in checkpoints: a resume that
        # started from zero again would take every code the next batch misses for dead and move it.
        self.register_buffer("_code_usage", torch.zeros(self.config.codebook_size))

    def setup(self, stage: str) -> None:
        """The data's image size and resize must be the tokenizer's resolution and resize: the checkpoint records both,
        and every later user (tokenize, evaluate) prepares images by them, so training another way would serve
        images of a scale or shape never seen."""
        data = self.trainer.datamodule
        for field, setting in (("image_size", "resolution"), ("resize", "resize")):
            value, want = getattr(data, field, None), getattr(self.config, setting)
            if value is not None and value != want:
                raise VQGANConfigError(f"data.{field}: {value}, but model.tokenizer.{setting} is {want}; "
                                       "set both to the same value")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume must train the model it saved: another codebook, channels, EMA or discriminator was a 60-line
        state-dict traceback (hundreds of key names on one line); here one line names the setting. Checkpoints
        written before the usage was saved resume with every code given its grace period."""
        state = checkpoint.get("state_dict", {})
        if "_code_usage" not in state and "_code_usage" in self.state_dict():
            state["_code_usage"] = torch.full((self.config.codebook_size,), 10 * DEAD_CODE_USAGE)
        own = self.state_dict()
        if any(key.startswith("ema.") for key in state) != (self.ema is not None):
            had = "with" if self.ema is None else "without"
            raise UserError("--ckpt_path", f"the checkpoint was trained {had} EMA weights; resume with its "
                                           "model.init_args.ema_decay")
        missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
        reshaped = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or reshaped:
            first = (f"{reshaped[0]} is {tuple(state[reshaped[0]].shape)} there, {tuple(own[reshaped[0]].shape)} "
                     "here" if reshaped else f"{(missing or unexpected)[0]} is {'missing' if missing else 'extra'} there")
            saved, now = (checkpoint.get(LIGHTNING_KEY) or {}).get("config") or {}, self.config.to_dict()
            changed = [f"{key} {value} (now {now[key]})" for key, value in saved.items() if key in now and value != now[key]]
            settings = f"; its tokenizer differs: {', '.join(changed)}" if changed else ""  # a cause, or a harmless change
            raise UserError("--ckpt_path", f"the checkpoint's weights do not fit this model ({len(missing)} missing, "
                                           f"{len(unexpected)} extra, {len(reshaped)} of another shape; {first}"
                                           f"{settings}): resume with its model settings")

    # -- losses ---------------------------------------------------------------------
    def _rec_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        return F.l1_loss(xrec, x) if self.reconstruction == "l1" else F.mse_loss(xrec, x)

    def _perceptual(self, x: Tensor, xrec: Tensor) -> Tensor | None:
        if not self._lpips:
            return None
        lpips = self._lpips[0].to(x.device)
        to_pm1 = lambda t: from_value_range(t, self.config.value_range) * 2 - 1  # noqa: E731 - LPIPS takes [-1, 1]
        return lpips(to_pm1(x), to_pm1(xrec)).mean()

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """taming's balance: ||d nll / d last|| / ||d g_loss / d last||, clamped, times disc_weight."""
        last = self.tokenizer.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.disc_weight

    # -- steps ----------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        x = to_value_range(batch, self.config.value_range)
        xrec, quantized = self.tokenizer(x)
        rec_loss = self._rec_loss(x, xrec)
        nll = rec_loss
        perceptual = self._perceptual(x, xrec)
        if perceptual is not None:
            nll = nll + self.lpips_weight * perceptual
        loss = nll + quantized.loss
        logs: dict[str, Any] = {"rec_loss": rec_loss, "vq_loss": quantized.loss}
        if self.global_step >= self.disc_start:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (xrec,)).mean()  # reaches the generator only
            d_weight = self._adaptive_weight(nll, g_loss)
            logits_real, logits_fake = self.discriminator(x.detach()), self.discriminator(xrec.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)  # reaches the discriminator only
            loss = loss + d_weight * g_loss + d_loss
            logs.update(g_loss=g_loss, d_weight=d_weight, d_loss=d_loss)
            logs.update(logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()  # clips the gradients first: `on_before_optimizer_step`
        if self.ema is not None:
            self.ema.update_parameters(self.tokenizer)
        if perceptual is not None:
            logs["lpips"] = perceptual
        counts = torch.bincount(quantized.indices.flatten(), minlength=self.config.codebook_size)
        logs["codebook_usage"], logs["perplexity"] = codebook_stats(counts)
        if self.restart_dead_codes:
            # Every rank must restart the same codes onto the same vectors, or the DDP replicas' codebooks drift
            # apart: usage counts the mean over ranks, and rank 0's restarted codebook becomes every rank's.
            step_counts = self.trainer.strategy.reduce(counts.float(), reduce_op="mean")
            self._code_usage.mul_(USAGE_DECAY).add_(step_counts, alpha=1 - USAGE_DECAY)
            dead = self._code_usage < DEAD_CODE_USAGE
            restarted = self.tokenizer.quantize.restart(dead, quantized.latents)
            if restarted:
                codebook = self.tokenizer.quantize.embedding.weight.data
                codebook.copy_(self.trainer.strategy.broadcast(codebook, src=0))
            logs["restarted_codes"] = float(restarted)
            self._code_usage[dead] = 10 * DEAD_CODE_USAGE  # ~230 steps to be picked before judged again
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=x.shape[0])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])  # generator + discriminator
        if self.image_log_every_n_steps and self.global_step % self.image_log_every_n_steps == 0:
            self._log_grid(batch, from_value_range(xrec.detach(), self.config.value_range), "train")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip each group's gradients here, not after `manual_backward`: the precision plugin calls this hook once the
        gradients are unscaled. Under `16-mixed` they are multiplied by the GradScaler's loss scale (65536 at first)
        until then, and a clip there would shrink every update to about 1/65536 of `grad_clip`."""
        if self.grad_clip is not None:
            for group in optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.grad_clip)

    def _eval_model(self) -> VQTokenizer:
        return self.ema.module if self.ema is not None else self.tokenizer

    def on_validation_epoch_start(self) -> None:
        self._code_counts.zero_()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = to_value_range(batch, self.config.value_range)
        xrec, quantized = self._eval_model()(x)
        rec01 = from_value_range(xrec, self.config.value_range).clamp(0, 1)
        self._code_counts += torch.bincount(quantized.indices.flatten(), minlength=self.config.codebook_size)
        self.log("val/rec_loss", self._rec_loss(x, xrec), batch_size=x.shape[0], sync_dist=True)
        # The mean of per-image PSNRs over every rank's images, as `tokenizer.evaluate` reports it.
        psnr = image_psnr(rec01.float(), batch.float())
        self.log("val/psnr", psnr.mean(), batch_size=x.shape[0], sync_dist=True)
        if batch_idx == 0:
            self._log_grid(batch, rec01, "val")

    def on_validation_epoch_end(self) -> None:
        usage, perplexity = codebook_stats(self.trainer.strategy.reduce(self._code_counts, reduce_op="sum"))
        self.log_dict({"val/codebook_usage": usage, "val/perplexity": perplexity})

    def _log_grid(self, images: Tensor, reconstructions: Tensor, split: str) -> None:
        """Inputs (top row) over reconstructions, as a PNG in the run's log dir (and TensorBoard if used), by rank 0.
        Every rank calls it: `trainer.log_dir` is a broadcast, which rank 0 alone waited in forever under DDP."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.trainer.is_global_zero:
            return
        n = min(8, images.shape[0])
        grid = torchvision.utils.make_grid(torch.cat([images[:n], reconstructions[:n].clamp(0, 1)]).float().cpu(), nrow=n)
        out_dir = Path(log_dir) / "reconstructions"
        out_dir.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, out_dir / f"{split}_step{self.global_step:07d}.png")
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"{split}/reconstructions", grid, self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [{"params": list(self.tokenizer.parameters())}, {"params": list(self.discriminator.parameters())}],
            lr=self.learning_rate,
            betas=self.betas,
            weight_decay=self.weight_decay,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what `tokenizer.load` needs: the architecture and which weights to export."""
        prefix = "ema.module." if self.ema is not None else "tokenizer."
        checkpoint[LIGHTNING_KEY] = {"config": self.config.to_dict(), "prefix": prefix}
