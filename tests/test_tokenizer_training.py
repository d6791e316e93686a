"""`lightning fit -c configs/vqgan_tiny.yaml` trains on CPU and writes a checkpoint tokenizer.load reads."""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision

import tokenizer
from common.errors import UserError
from conftest import tiny_vqgan_config
from lvm.cli import main as lightning_cli
from tokenizer.data import ImageDataModule, ImageFolder, make_transform
from tokenizer.preprocess import to_value_range
from tokenizer.synthetic import write_images
from tokenizer.training import DEAD_CODE_USAGE, USAGE_DECAY, VQGANTraining, ema_with_warmup, hinge_d_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vqgan_tiny.yaml"


def _l1(model: tokenizer.VQTokenizer, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).reconstruction - images).abs().mean())


def test_tiny_fit_lowers_reconstruction_resumes_and_checkpoint_loads(tmp_path: Path, monkeypatch, capsys) -> None:
    write_images(tmp_path / "train", 16, size=64, seed=0)
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png")  # skipped, and counted in the last line
    write_images(tmp_path / "val", 4, size=64, seed=1)
    monkeypatch.chdir(tmp_path)  # the config writes runs/vqgan_tiny/ in the working directory
    fit = [
        "fit",
        "-c", str(CONFIG),
        f"--data.init_args.train={tmp_path / 'train'}",
        f"--data.init_args.val={tmp_path / 'val'}",
        "--data.init_args.batch_size=4",
        "--trainer.val_check_interval=8",
        "--model.init_args.disc_start=10",  # exercise the GAN + adaptive weight path too
        "--model.init_args.image_log_every_n_steps=8",
    ]
    lightning_cli([*fit, "--trainer.max_steps=12"])
    lightning_cli([*fit, "--trainer.max_steps=16", "--ckpt_path", "last"])  # continues; does not start over
    last = capsys.readouterr().err.splitlines()[-1]  # the summary line of TrainingProgress
    assert last.startswith("trained steps 12..16 in ") and last.endswith("; 1 unreadable input skipped (warned above)")
    first, resumed = (list(csv.DictReader((tmp_path / f"runs/vqgan_tiny/lightning_logs/version_{v}/metrics.csv").open()))
                      for v in (0, 1))
    assert [int(row["step"]) for row in resumed if row.get("train/loss")] == [14]  # logged every 5 steps from 12
    assert any(row.get("train/d_loss") for row in resumed), "discriminator never trained"  # from step 10
    assert any(row.get("val/codebook_usage") for row in first + resumed)
    assert sorted((tmp_path / "runs/vqgan_tiny/lightning_logs").glob("version_*/reconstructions/val_*.png"))

    ckpt = tmp_path / "runs/vqgan_tiny/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 16
    trained = tokenizer.load(ckpt)
    assert trained.config.resolution == 64 and trained.tokens_per_image == 16
    torch.manual_seed(0)
    untrained = tokenizer.VQTokenizer(trained.config).eval()
    dataset = ImageFolder(tmp_path / "val", make_transform(64, train=False))
    images = torch.stack([dataset[i] for i in range(len(dataset))])  # [0, 1] == the tiny model's range
    trained_l1, untrained_l1 = _l1(trained, images), _l1(untrained, images)
    assert trained_l1 < 0.6 * untrained_l1, (trained_l1, untrained_l1)
    tokens = trained.encode(list(images.mul(255).round().to(torch.uint8)))
    assert tokens.shape == (4, 16) and trained.decode(tokens).shape == (4, 3, 64, 64)


class SaveCodebook(Callback):
    """Each rank saves its codebook when training ends (rank{N}.pt in `out`)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.tokenizer.quantize.embedding.weight.detach().cpu(), self.out / f"rank{trainer.global_rank}.pt")


def test_dead_code_restarts_keep_the_ddp_replicas_codebooks_equal(tmp_path: Path) -> None:
    """Two CPU processes see different batches; the codes they restart must still be the same on both. With
    validation and image logs: rank 0 alone waited in the log folder's broadcast, forever (review 54 #1)."""
    write_images(tmp_path / "train", 8, size=64, seed=0)
    write_images(tmp_path / "val", 2, size=64, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [
        sys.executable, "-m", "lvm.cli", "fit", "-c", str(CONFIG),
        f"--data.init_args.train={tmp_path / 'train'}", f"--data.init_args.val={tmp_path / 'val'}",
        "--data.init_args.batch_size=2", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.devices=2",
        "--trainer.strategy=ddp_find_unused_parameters_true", "--model.init_args.image_log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--model.init_args.restart_dead_codes=true",
        "--trainer.callbacks+=test_tokenizer_training.SaveCodebook", f"--trainer.callbacks.out={tmp_path / 'books'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Tip" not in done.stdout + done.stderr and "LeafSpec" not in done.stderr  # Lightning's noise (lvm/cli.py)
    assert "tensorboard" not in done.stderr.lower()  # Lightning's note on its default logger, filtered (lvm/cli.py)
    assert done.stderr.splitlines()[-1].endswith("; no unreadable inputs")
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    assert any(float(row.get("train/restarted_codes") or 0) > 0 for row in rows), "no code was restarted"
    assert torch.equal(torch.load(tmp_path / "books" / "rank0.pt"), torch.load(tmp_path / "books" / "rank1.pt"))
    grids = sorted(p.name for p in (tmp_path / "run").rglob("reconstructions/*.png"))
    assert "train_step0000001.png" in grids and any(name.startswith("val_") for name in grids), grids


class _FirstBatch(Callback):
    """Keeps a copy of the first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = batch.detach().clone()


def test_all_loss_terms_and_ema_train(
    tmp_path: Path, fake_lpips_weights: tuple[Path, Path]
) -> None:
    """Two batches with every loss term on (LPIPS from local files at weight 0.5, GAN from step 0, EMA)."""
    write_images(tmp_path / "train", 4, size=64, seed=0)
    torch.manual_seed(0)  # fixed weights: the g_loss sign check below needs a nonzero logit
    module = VQGANTraining(
        tiny_vqgan_config(), lpips_weight=0.5, lpips_vgg16=str(fake_lpips_weights[0]),
        lpips_linear=str(fake_lpips_weights[1]), disc_start=0, disc_channels=8, disc_layers=1, ema_decay=0.9,
    )
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    initial = copy.deepcopy(module)
    logged, log_dict = [], module.log_dict
    module.log_dict = lambda values, **kwargs: (logged.append({k: float(v) for k, v in values.items()}), log_dict(values, **kwargs))
    first_batch = _FirstBatch()
    trainer = Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[first_batch])
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for name in ("train/lpips", "train/g_loss", "train/d_loss", "train/d_weight", "train/rec_loss"):
        assert torch.isfinite(metrics[name]), name
    assert float(metrics["train/lpips"]) > 0
    # Step 0's adaptive weight by hand: gradient norms at the decoder's last layer by separate backward passes.
    x = first_batch.batch  # [0, 1] is the tiny model's range
    xrec, _ = initial.tokenizer(x)
    last = initial.tokenizer.decoder.conv_out.weight
    lpips = initial._lpips[0](x * 2 - 1, xrec * 2 - 1).mean()
    (F.l1_loss(xrec, x) + 0.5 * lpips).backward(retain_graph=True)  # lpips_weight scales LPIPS in the balance
    nll_norm, last.grad = last.grad.norm(), None
    g_loss = -initial.discriminator(xrec).mean()
    g_loss.backward()
    expected = min(float(nll_norm / (last.grad.norm() + 1e-4)), 1e4) * 0.5  # taming's clamp, disc_weight 0.5
    assert logged[0]["train/d_weight"] == pytest.approx(expected, rel=1e-4)
    # The generator lowers its loss by raising D's logit on reconstructions (the adaptive weight cannot see the sign).
    assert abs(float(g_loss)) > 1e-6 and logged[0]["train/g_loss"] == pytest.approx(float(g_loss), rel=1e-5)
    assert logged[0]["train/lpips"] == pytest.approx(float(lpips), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert not any(key.startswith(("_lpips", "lpips")) for key in module.state_dict())  # VGG stays out of checkpoints
    assert int(module.ema.n_averaged) == 2


def test_lightnings_advice_for_manual_optimization_checkpoints_is_not_printed() -> None:
    """Every periodic VQGAN checkpoint made Lightning print 12 lines asking to save the pre-step state in
    training_step; the post-step state it saves is the one a resume continues from (tokenizer.training's filter)."""
    warn = ("from lightning.pytorch.utilities import rank_zero_warn; rank_zero_warn('Using ModelCheckpoint with "
            "manual optimization and every_n_train_steps, but no pre-optimization state was saved.')")
    # in a fresh process, as a user runs it: pytest drops the warning filters that modules set while it collects
    for imports, printed in (("", True), ("import tokenizer.training; ", False)):
        run = subprocess.run([sys.executable, "-c", imports + warn], capture_output=True, text=True, check=True)
        assert ("pre-optimization state" in run.stderr) is printed, imports


def test_hinge_d_loss_exact_values() -> None:
    """Real logits are pushed above +1 and fake ones below -1; beyond the margins nothing is left to learn."""
    assert float(hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0]))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.full((4,), 0.5))) == pytest.approx(0.5 * (1.0 + 1.5))
    real, fake = torch.tensor([0.5, 3.0]), torch.tensor([-3.0, 0.0])  # means of the clipped terms: 0.25 and 0.5
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))


def test_ema_warmup_tracks_early_weights() -> None:
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    ema_with_warmup(0.999)(averaged, current, 1)  # decay min(0.999, 2/11)
    assert torch.allclose(averaged[0], torch.full((3,), 1 - 2 / 11))
    averaged = [torch.zeros(3)]
    ema_with_warmup(0.5)(averaged, current, 10_000)  # decay capped at 0.5
    assert torch.allclose(averaged[0], torch.full((3,), 0.5))


class _StateAtStart(Callback):
    """Keeps a copy of the module's state when training (re)starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step


def test_vqgan_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    write_images(tmp_path / "train", 4, size=64, seed=0)
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    options = dict(lpips_weight=0.0, disc_start=2, disc_channels=8, disc_layers=1, ema_decay=0.9, restart_dead_codes=True)
    quiet = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False)
    torch.manual_seed(0)
    first = VQGANTraining(tiny_vqgan_config(), **options)
    trainer = Trainer(max_steps=4, default_root_dir=tmp_path / "run", **quiet)
    trainer.fit(first, data)
    trainer.save_checkpoint(tmp_path / "step4.ckpt")

    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    resumed, at_start = VQGANTraining(tiny_vqgan_config(), **options), _StateAtStart()
    trainer = Trainer(max_steps=6, default_root_dir=tmp_path / "run2", callbacks=[at_start], **quiet)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "step4.ckpt")
    assert at_start.step == 4 and trainer.global_step == 6
    final = first.state_dict()  # generator, discriminator and EMA weights, the EMA's count and the code usage as saved
    assert "_code_usage" in final  # else the resumed run takes every code its first batch misses for dead
    assert set(at_start.state) == set(final) and all(torch.equal(at_start.state[k], v) for k, v in final.items())
    assert int(resumed.ema.n_averaged) == 6
    optimizer = trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in resumed.tokenizer.parameters()} == {6}
    assert {int(optimizer.state[p]["step"]) for p in resumed.discriminator.parameters()} == {4}  # GAN from step 2
    exported = tokenizer.load(tmp_path / "step4.ckpt")
    assert exported.config == first.config
    # The tokenizer a checkpoint gives is the EMA of the weights (every shipped config has one), not the last step's.
    ema, raw = first.ema.module.state_dict(), first.tokenizer.state_dict()
    assert all(torch.equal(value, ema[key]) for key, value in exported.state_dict().items())
    assert any(not torch.equal(value, raw[key]) for key, value in exported.state_dict().items())
    # another model than the checkpoint's is one line naming the setting, not a state-dict traceback (review 54 #4)
    checkpoint = torch.load(tmp_path / "step4.ckpt", weights_only=True)
    other_codes = tiny_vqgan_config()
    other_codes.codebook_size *= 2
    for module, message in (
        (VQGANTraining(other_codes, **options), rf"^--ckpt_path: the checkpoint's weights do not fit this model \(0 "
                                                rf"missing, 0 extra, \d+ of another shape; .*; its tokenizer differs: "
                                                rf"codebook_size {other_codes.codebook_size // 2} \(now "
                                                rf"{other_codes.codebook_size}\)\): resume with its model settings$"),
        (VQGANTraining(tiny_vqgan_config(), **{**options, "ema_decay": None}),
         r"^--ckpt_path: the checkpoint was trained with EMA weights; resume with its model.init_args.ema_decay$"),
        (VQGANTraining(tiny_vqgan_config(), **{**options, "disc_channels": 16}),
         r"^--ckpt_path: the checkpoint's weights do not fit this model \(0 missing, 0 extra, \d+ of another shape; "
         r"discriminator\..* is \(8, .*\) there, \(16, .*\) here\): resume with its model settings$"),
    ):
        with pytest.raises(UserError, match=message):
            module.on_load_checkpoint(copy.deepcopy(checkpoint))
    resumed.on_load_checkpoint(copy.deepcopy(checkpoint))  # its own model: no refusal
    fsq = tiny_vqgan_config()
    fsq.fsq_levels = [8, 5, 5, 5]
    fsq_module = VQGANTraining(fsq, **{**options, "restart_dead_codes": False})
    older = {"state_dict": {k: v for k, v in fsq_module.state_dict().items() if k != "_code_usage"}}
    fsq_module.on_load_checkpoint(older)  # an FSQ checkpoint from before the usage was saved (review 57 #4)
    assert "_code_usage" in older["state_dict"]


def test_validation_scores_the_ema_weights(tmp_path: Path) -> None:
    """val/* must describe the tokenizer a checkpoint exports (the EMA), not the weights of the last step."""
    write_images(tmp_path / "train", 4, size=64, seed=0)
    data = ImageDataModule(train=str(tmp_path / "train"), val=str(tmp_path / "train"), image_size=64, batch_size=4,
                           num_workers=0)
    torch.manual_seed(0)
    module = VQGANTraining(tiny_vqgan_config(), lpips_weight=0.0, disc_start=100, ema_decay=0.9)
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=4,
                      check_val_every_n_epoch=None, default_root_dir=tmp_path)
    trainer.fit(module, data)
    x = to_value_range(next(iter(data.val_dataloader())), module.config.value_range)
    with torch.no_grad():
        ema = float(module._rec_loss(x, module.ema.module(x)[0]))
        raw = float(module._rec_loss(x, module.tokenizer(x)[0]))
    assert abs(ema - raw) > 1e-4  # the check can tell them apart
    assert float(trainer.callback_metrics["val/rec_loss"]) == pytest.approx(ema, rel=1e-5)


def test_a_checkpoint_saved_before_code_usage_loads_with_every_code_in_its_grace_period() -> None:
    """Zero usage would make the next step restart every code its batch misses: a trained codebook wiped."""
    model = VQGANTraining(tiny_vqgan_config(), lpips_weight=0.0, restart_dead_codes=True)
    old = {"state_dict": {k: v for k, v in model.state_dict().items() if k != "_code_usage"}}
    model.on_load_checkpoint(old)
    model.load_state_dict(old["state_dict"])
    assert bool((model._code_usage * USAGE_DECAY >= DEAD_CODE_USAGE).all())  # none dead after one step unused


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_gradients_are_clipped_after_the_fp16_loss_scale_is_undone(tmp_path: Path, precision: str) -> None:
    """Under 16-mixed the gradients carry the GradScaler's scale (65536) until Lightning unscales them: a clip
    before that would leave an update of grad_clip / 65536. Lightning's own 16-mixed plugin, with a CPU GradScaler."""
    write_images(tmp_path / "train", 2, size=64, seed=0)
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    torch.manual_seed(0)
    module = VQGANTraining(tiny_vqgan_config(), lpips_weight=0.0, disc_start=100, grad_clip=0.5)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if precision == "16-mixed" else []
    norms: list[float] = []

    class StepNorms(Callback):
        """Norm of the generator's gradients the optimizer stepped with (after the step: 32-true runs the closure, which
        clips, inside `step`)."""

        def on_train_start(self, trainer, pl_module) -> None:
            params = list(pl_module.tokenizer.parameters())
            trainer.optimizers[0].register_step_post_hook(
                lambda *_: norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))))

    trainer = Trainer(max_steps=1, accelerator="cpu", plugins=plugins, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[StepNorms()])
    trainer.fit(module, data)
    assert norms == [pytest.approx(0.5, rel=1e-3)]  # unclipped it is ~3


def test_restarted_codes_get_a_grace_period(tmp_path: Path) -> None:
    """The first step takes every code its batch misses for dead and restarts it; their usage is then set high enough
    that the next step, picking few of them, restarts none (else they would move again every step)."""
    write_images(tmp_path / "train", 4, size=64, seed=0)
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    torch.manual_seed(0)
    module = VQGANTraining(tiny_vqgan_config(), lpips_weight=0.0, disc_start=100, restart_dead_codes=True)
    restarted, log_dict = [], module.log_dict
    module.log_dict = lambda values, **kwargs: (restarted.append(float(values["train/restarted_codes"])),
                                                log_dict(values, **kwargs))
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, data)
    assert restarted[0] > 8000 and restarted[1] == 0  # 8192 codes, 32 latents a batch


def test_a_minus_one_to_one_tokenizer_trains_on_its_range_and_lpips_on_minus_one_to_one(
    tmp_path: Path, fake_lpips_weights: tuple[Path, Path]
) -> None:
    """Batches come in [0, 1]: a [-1, 1] (taming-style) tokenizer must see them mapped to [-1, 1], as tokenize will
    feed it, and LPIPS, which takes [-1, 1], must get that same image, not a second mapping of it."""
    write_images(tmp_path / "train", 2, size=64, seed=0)
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    torch.manual_seed(0)
    module = VQGANTraining(dataclasses.replace(tiny_vqgan_config(), value_range=(-1.0, 1.0)), lpips_weight=1.0,
                           lpips_vgg16=str(fake_lpips_weights[0]), lpips_linear=str(fake_lpips_weights[1]), disc_start=100)
    seen: dict[str, torch.Tensor] = {}

    def keep_first_input(name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].detach().clone())
        return hook

    module.tokenizer.register_forward_pre_hook(keep_first_input("tokenizer"))
    module._lpips[0].register_forward_pre_hook(keep_first_input("lpips"))
    first_batch = _FirstBatch()
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[first_batch]).fit(module, data)
    expected = first_batch.batch * 2 - 1
    assert float(expected.min()) < -0.5
    torch.testing.assert_close(seen["tokenizer"], expected)
    torch.testing.assert_close(seen["lpips"], expected)


@pytest.mark.parametrize(("settings", "message"), [
    ({"learning_rate": -1.0}, "model.learning_rate: must be > 0, got -1.0"),
    ({"betas": (1.5, 0.9)}, "model.betas: must be two numbers in [0, 1), got (1.5, 0.9)"),
    ({"ema_decay": 2.0}, "model.ema_decay: must be in [0, 1) or null, got 2.0"),  # it trained, the average frozen
    ({"disc_channels": 0}, "model.disc_channels: must be >= 1, got 0"),
])
def test_impossible_training_settings_are_one_line_before_any_step(settings, message):
    """AdamW's own checks were 43-80 line tracebacks once training began, and an EMA decay of 2 trained silently
    (review 61 #10), where the LVM's module refuses the same values in one line."""
    with pytest.raises(UserError) as error:
        tokenizer.training.VQGANTraining(tiny_vqgan_config(), lpips_weight=0.0, **settings)
    assert str(error.value) == message
    with pytest.raises(UserError, match=r"^data.batch_size: must be >= 1, got 0$"):
        ImageDataModule(train="unused", batch_size=0)
