"""Training data sources, LPIPS from local files, and `python -m tokenizer.evaluate`."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from tokenizer.data import ImageDataModule
from tokenizer.evaluate import main as evaluate_main
from tokenizer.lpips import load_lpips
from tokenizer.synthetic import write_images


def _write_shard(path: Path, images: list[Path]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            data = image.read_bytes() if i != 1 else b"not a png"  # one corrupt sample
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_and_webdataset_sources_give_unit_range_batches(tmp_path: Path) -> None:
    images = write_images(tmp_path / "folder", 6, size=48, seed=0)
    (tmp_path / "folder" / "broken.png").write_bytes(b"broken")
    _write_shard(tmp_path / "train-000000.tar", images)
    for source in (str(tmp_path / "folder"), str(tmp_path / "train-{000000..000000}.tar")):
        data = ImageDataModule(train=source, val=source, image_size=32, batch_size=3, num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # webdataset warns about the corrupt sample it skips
            batches = [b for b in data.val_dataloader()]
        sizes = [len(b) for b in batches]
        # the folder's broken file is replaced by a readable neighbour; the shard's corrupt sample is dropped
        assert sum(sizes) == (5 if source.endswith(".tar") else 7), (source, sizes)
        assert all(b.shape[1:] == (3, 32, 32) and b.dtype == torch.float32 for b in batches)
        assert float(torch.cat(batches).min()) >= 0 and float(torch.cat(batches).max()) <= 1
        train_batch = next(iter(data.train_dataloader()))
        assert train_batch.shape == (3, 3, 32, 32)


def test_lpips_from_local_files(fake_lpips_weights: tuple[Path, Path]) -> None:
    lpips = load_lpips(*fake_lpips_weights)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    distance = lpips(x, y)
    assert distance.shape == (2,) and bool((distance > 0).all())
    assert torch.allclose(distance, lpips(y, x), rtol=1e-5)


def test_lpips_absent_warns_and_returns_none(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="LPIPS weights not found .* training without the perceptual loss"):
        assert load_lpips(tmp_path / "none.pth", tmp_path / "none2.pth") is None


def test_evaluate_cli(tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "images", 5, size=40, seed=3)
    (tmp_path / "images" / "zz_corrupt.png").write_bytes(b"oops")
    out = tmp_path / "result.json"
    code = evaluate_main(["--tokenizer", str(tiny_tokenizer_dir), "--images", str(tmp_path / "images"), "--num-workers", "0", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == 5 and result["skipped"] == [str(tmp_path / "images" / "zz_corrupt.png")]
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1 and 0 < result["codebook_usage"] <= 80 / 8192
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("5 images: PSNR ") and summary.endswith("1 skipped")


def test_evaluate_cli_bad_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--tokenizer", str(bad), "--images", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {bad}: corrupt or not a PyTorch checkpoint (unpickling failed)\n"
