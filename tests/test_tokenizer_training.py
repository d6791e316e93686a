"""`lightning fit -c configs/vqgan_tiny.yaml` trains on CPU and writes a checkpoint tokenizer.load reads."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch import Trainer

import tokenizer
from conftest import tiny_vqgan_config
from lvm.cli import main as lightning_cli
from tokenizer.data import ImageDataModule, ImageFolder, make_transform
from tokenizer.synthetic import write_images
from tokenizer.training import VQGANTraining, ema_with_warmup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqgan_tiny.yaml"


def _l1(model: tokenizer.VQTokenizer, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).reconstruction - images).abs().mean())


def test_tiny_fit_lowers_reconstruction_and_checkpoint_loads(tmp_path: Path) -> None:
    write_images(tmp_path / "train", 16, size=64, seed=0)
    write_images(tmp_path / "val", 4, size=64, seed=1)
    lightning_cli(
        [
            "fit",
            "-c", str(CONFIG),
            f"--data.init_args.train={tmp_path / 'train'}",
            f"--data.init_args.val={tmp_path / 'val'}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--data.init_args.batch_size=4",
            "--trainer.max_steps=16",
            "--trainer.val_check_interval=8",
            "--model.init_args.disc_start=10",  # exercise the GAN + adaptive weight path too
            "--model.init_args.image_log_every_n_steps=8",
        ]
    )
    run = next((tmp_path / "run").rglob("metrics.csv")).parent
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(row.get("train/d_loss") for row in rows), "discriminator never trained"
    assert any(row.get("val/codebook_usage") for row in rows)
    assert sorted(p.name for p in (run / "reconstructions").glob("val_*.png"))

    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
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


def test_all_loss_terms_and_ema_train(
    tmp_path: Path, fake_lpips_weights: tuple[Path, Path]
) -> None:
    """Two batches with every loss term on (LPIPS from local files, GAN from step 0, EMA)."""
    write_images(tmp_path / "train", 4, size=64, seed=0)
    module = VQGANTraining(
        tiny_vqgan_config(), lpips_weight=1.0, lpips_vgg16=str(fake_lpips_weights[0]),
        lpips_linear=str(fake_lpips_weights[1]), disc_start=0, disc_channels=8, disc_layers=1, ema_decay=0.9,
    )
    data = ImageDataModule(train=str(tmp_path / "train"), image_size=64, batch_size=2, num_workers=0)
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    trainer = Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for name in ("train/lpips", "train/g_loss", "train/d_loss", "train/d_weight", "train/rec_loss"):
        assert torch.isfinite(metrics[name]), name
    assert float(metrics["train/lpips"]) > 0 and float(metrics["train/d_weight"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert not any(key.startswith(("_lpips", "lpips")) for key in module.state_dict())  # VGG stays out of checkpoints
    assert int(module.ema.n_averaged) == 2


def test_ema_warmup_tracks_early_weights() -> None:
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    ema_with_warmup(0.999)(averaged, current, 1)  # decay min(0.999, 2/11)
    assert torch.allclose(averaged[0], torch.full((3,), 1 - 2 / 11))
    averaged = [torch.zeros(3)]
    ema_with_warmup(0.5)(averaged, current, 10_000)  # decay capped at 0.5
    assert torch.allclose(averaged[0], torch.full((3,), 0.5))
