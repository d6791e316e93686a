"""`python -m lvm.tokenize`: img2dataset tars, image folders, videos -> token shards.

Everything runs on the tiny tokenizer (64x64 images, 16 tokens); most runs are in-process with
`--workers 0`, and the byte-equality tests also run with worker processes and a real kill -9.
"""

from __future__ import annotations

import fractions
import io
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import tokenizer
from common.errors import UserError
from common.ranks import ranks_from_env
from conftest import tiny_vqgan_config
from lvm.palette import colour_labels, label_palette
from lvm.tokenize import TokenizeError, pipeline
from lvm.tokenize.__main__ import main, parse_args
from lvm.tokenize.decode import DecodeOptions, Picture, decode_image, read_batches, read_video
from lvm.tokenize.derive import apply_mask, gray, mask_params
from lvm.tokenize.pipeline import Options
from lvm.tokenize.sources import find_units
from lvm.tokenize.writer import ShardWriter, shard_state
from tokenizer.preprocess import resize_square, to_rgb_float, to_value_range

RNG = np.random.default_rng(0)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    smooth = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
    noise = RNG.integers(0, 60, (height, width, 3))
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _img2dataset_shard(path: Path, shard: int, count: int) -> None:
    members = []
    for i in range(count):
        key = f"{shard:05d}{i:04d}"
        meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "exif": "{...}",
                "original_width": 640, "original_height": 480}
        members += [(f"{key}.jpg", _jpeg(40 + 3 * i, 56)), (f"{key}.json", json.dumps(meta).encode()),
                    (f"{key}.txt", f"photo {key}".encode())]
    _write_tar(path, members)


def _video(path: Path, frames: int, codec: str = "mpeg4", options: dict | None = None, title: str | None = None) -> None:
    with av.open(str(path), "w") as container:
        if title is not None:
            container.metadata["title"] = title
        stream = container.add_stream(codec, rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((48, 64, 3), np.uint8)
            pixels[:, : 6 * (i + 1)] = (255, 40 * (i % 6), 0)  # a bar that grows frame by frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """laion/ (3 img2dataset tars), photos/ (mixed modes and sizes, nested), clips/ (2 videos)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "laion").mkdir()
    for shard in range(3):
        _img2dataset_shard(root / "laion" / f"{shard:05d}.tar", shard, 3)
    photos = root / "photos"
    (photos / "cats").mkdir(parents=True)
    (photos / "dogs").mkdir()
    (photos / "cats" / "rgba.png").write_bytes(_png(RNG.integers(0, 255, (30, 50, 4), dtype=np.uint8)))
    (photos / "cats" / "gray.png").write_bytes(_png(RNG.integers(0, 255, (64, 64), dtype=np.uint8)))
    (photos / "dogs" / "deep.png").write_bytes(_png((RNG.integers(0, 65535, (33, 17))).astype(np.uint16)))
    (photos / "dogs" / "thin.jpg").write_bytes(_jpeg(3, 301))
    (photos / "dogs" / "tiny.webp").write_bytes(_png(RNG.integers(0, 255, (1, 1, 3), dtype=np.uint8)))
    (photos / "top.v2.jpg").write_bytes(_jpeg(64, 64))  # a dot in the stem: key top_v2
    (photos / "notes.txt").write_text("not an image")  # ignored
    (root / "clips").mkdir()
    _video(root / "clips" / "a.mp4", 5)
    _video(root / "clips" / "b.mkv", 3, codec="ffv1")
    return root


def _run(tokenizer_dir: Path, out: Path, *shards: str | Path, extra: tuple[str, ...] = ()) -> int:
    """The command's exit status."""
    args = ["--shards", *map(str, shards), "--out", str(out), "--tokenizer", str(tokenizer_dir)]
    try:
        return main([*args, "--workers", "0", "--batch-size", "2", *extra])
    except SystemExit as exit_:
        return int(exit_.code)


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1) if "/" not in member.name else (
                member.name.rsplit("/", 1)[0] + "/" + member.name.rsplit("/", 1)[1].split(".", 1)[0],
                member.name.rsplit("/", 1)[1].split(".", 1)[1],
            )
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def _tokens(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _all_inputs(inputs: Path) -> list[Path]:
    return [inputs / "laion", inputs / "photos", inputs / "clips"]


REFERENCE_OPTIONS = ("--derive", "gray,masked", "--video-stride", "2", "--images-per-shard", "4")


def _encoded_as_the_reference_run(tok, pictures: list[tuple[str, Image.Image]], batch_size: int = 2) -> np.ndarray:
    """Tokens [3 (original, gray, masked), N, 16] of one unit's pictures (key, image), encoded exactly as the
    reference run encodes them: batches of `batch_size` pictures stacked as [B originals, B gray, B masked].

    Encoding the same pixels in other batches can flip near-tie codes (gaps of ~1e-6) on another CPU.
    """
    codes = []
    for start in range(0, len(pictures), batch_size):
        keys, x01 = zip(*[(key, to_rgb_float(image)) for key, image in pictures[start : start + batch_size]])
        variants = [x01, [gray(x) for x in x01], [apply_mask(x, mask_params(k, 0)) for k, x in zip(keys, x01)]]
        pixels = torch.stack([to_value_range(resize_square(x, tok.image_size, tok.config.resize).clamp(0, 1),
                                             tok.config.value_range) for variant in variants for x in variant])
        codes.append(tok.encode_pixels(pixels).view(3, len(keys), -1).numpy())
    return np.concatenate(codes, axis=1)


@pytest.fixture(scope="module")
def reference(inputs: Path, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run over everything, with both derived variants."""
    out = tmp_path_factory.mktemp("reference")
    assert _run(tiny_tokenizer_dir, out, *_all_inputs(inputs), extra=REFERENCE_OPTIONS) == 0
    return out


def test_img2dataset_shards_give_one_token_shard_each(inputs, reference, tiny_tokenizer):
    for shard in range(3):
        samples = _samples(reference / f"{shard:05d}.tar")
        with tarfile.open(inputs / "laion" / f"{shard:05d}.tar") as tar:
            images = [Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())) for key in samples]
        assert list(samples) == [f"{shard:05d}{i:04d}" for i in range(3)]
        expected = _encoded_as_the_reference_run(tiny_tokenizer, list(zip(samples, images)))
        for row, (key, sample) in enumerate(samples.items()):
            assert set(sample) == {"tokens.npy", "gray.tokens.npy", "masked.tokens.npy", "json"}
            tokens = _tokens(sample["tokens.npy"])
            assert tokens.dtype == np.uint16 and tokens.shape == (16,)
            for variant, name in enumerate(("tokens.npy", "gray.tokens.npy", "masked.tokens.npy")):
                assert np.array_equal(_tokens(sample[name]), expected[variant, row]), (key, name)
            meta = json.loads(sample["json"])
            assert meta["source"] == str(inputs / "laion" / f"{shard:05d}.tar") and meta["key"] == key
            assert (meta["width"], meta["height"]) == (56, 40 + 3 * row)
            assert meta["url"] == f"https://example.com/{key}.jpg" and meta["original_width"] == 640
            assert meta["caption"] == f"photo {key}" and "exif" not in meta and meta["mask"] == mask_params(key, 0)
        report = json.loads((reference / f"{shard:05d}.report.json").read_text())
        assert (report["images"], report["skipped"], report["tokens"]) == (3, {}, 3 * 3 * 16)


def test_derived_variants_are_the_tokens_of_the_derived_pixels(reference):
    sample = _samples(reference / "00001.tar")["000010002"]
    assert json.loads(sample["json"])["mask"] == mask_params("000010002", 0)
    # gray and masked are derived at the original size in [0, 1], then get the tokenizer's own resize and range
    # (their tokens against `_encoded_as_the_reference_run`: test_img2dataset_shards_give_one_token_shard_each).
    assert not np.array_equal(_tokens(sample["gray.tokens.npy"]), _tokens(sample["tokens.npy"]))
    assert not np.array_equal(_tokens(sample["masked.tokens.npy"]), _tokens(sample["tokens.npy"]))


def test_folder_of_mixed_images(inputs, reference, tiny_tokenizer):
    shards = sorted(p.name for p in reference.glob("photos-img-*.tar"))
    assert shards == ["photos-img-000000.tar", "photos-img-000001.tar"]  # 6 images, 4 per shard, sorted paths
    samples = {**_samples(reference / shards[0]), **_samples(reference / shards[1])}
    assert list(samples) == ["cats/gray", "cats/rgba", "dogs/deep", "dogs/thin", "dogs/tiny", "top_v2"]
    metas = {key: json.loads(s["json"]) for key, s in samples.items()}
    assert (metas["dogs/deep"]["width"], metas["dogs/deep"]["height"]) == (17, 33)
    assert (metas["dogs/thin"]["width"], metas["dogs/thin"]["height"]) == (301, 3)
    assert metas["dogs/tiny"]["path"] == "dogs/tiny.webp" and metas["dogs/tiny"]["folder"] == "dogs"
    assert metas["top_v2"]["path"] == "top.v2.jpg" and metas["top_v2"]["folder"] == ""
    for shard in shards:  # RGBA, gray, 16-bit gray, JPEGs, a 1x1 WebP: the tokenizer's own tokens of each file
        keys = list(_samples(reference / shard))
        paths = {key: inputs / "photos" / metas[key]["path"] for key in keys}
        expected = _encoded_as_the_reference_run(tiny_tokenizer, [(key, Image.open(paths[key])) for key in keys])
        for row, key in enumerate(keys):
            tokens = _tokens(samples[key]["tokens.npy"])
            assert tokens.dtype == np.uint16 and tokens.shape == (16,)
            assert np.array_equal(tokens, expected[0, row]), key


def test_video_frames_at_a_stride(inputs, reference):
    samples = _samples(reference / "clips-vid-000000.tar")
    assert list(samples) == ["a/000000", "a/000002", "a/000004", "b/000000", "b/000002"]
    meta = json.loads(samples["a/000004"]["json"])
    assert (meta["key"], meta["video"], meta["frame"], meta["fps"], meta["time"]) == ("a", "clips/a", 4, 10.0, 0.4)
    assert (meta["width"], meta["height"], meta["source"]) == (64, 48, str(inputs / "clips" / "a.mp4"))
    frames = [_tokens(samples[f"a/{i:06d}"]["tokens.npy"]).tobytes() for i in (0, 2, 4)]
    assert len(set(frames)) == 3  # the frames differ, so do their tokens


def test_the_release_video_resize_is_opencvs_bilinear_resize():
    """The LVM release resized video frames with cv2.resize(frame, (256, 256)): bilinear, no antialiasing."""
    import cv2

    frame = RNG.integers(0, 256, (270, 480, 3), dtype=np.uint8)
    frame[::2] //= 3  # fine stripes: what antialiasing smooths away and plain bilinear aliases
    want = cv2.resize(frame, (64, 64)).astype(np.float64)
    got = {mode: resize_square(to_rgb_float(frame), 64, mode).permute(1, 2, 0).double().numpy() * 255
           for mode in ("release_video", "stretch")}
    assert np.abs(got["release_video"] - want).max() <= 1.0  # uint8 rounding
    assert np.abs(got["stretch"] - want).mean() > 10  # the tokenizer's own resize, for images


def test_the_release_video_resize_overrides_a_centre_crop_tokenizer_for_video_files_only():
    """The release stretched its video frames whatever the tokenizer does with images; masks follow the resize."""
    resize = pipeline.Resize(16, "center_crop", (0.0, 1.0), "release_video")
    frame = torch.rand(3, 24, 40)
    dataset = pipeline.UnitBatches([], Options(derive=("masked",), video_resize="release"), resize, 2)
    for video_file, mode, mask_mode in ((True, "release_video", "stretch"), (False, "center_crop", "center_crop")):
        _, _, (image, masked) = dataset._prepare(Picture("k", frame, {}, video_file=video_file))
        assert torch.equal(image, resize_square(frame, 16, mode).clamp(0, 1))
        assert torch.equal(masked, resize_square(apply_mask(frame, mask_params("k", 0), mask_mode), 16, mode).clamp(0, 1))


def test_video_frames_resized_as_the_release_with_video_resize_release(inputs, tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    (tmp_path / "clips").mkdir()
    with av.open(str(tmp_path / "clips" / "fine.mkv"), "w") as container:  # lossless, 4x the tokenizer's size
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 192, "yuv444p"
        for _ in range(3):
            pixels = RNG.integers(0, 256, (192, 256, 3), dtype=np.uint8)
            pixels[::2] //= 4  # fine stripes, which antialiasing smooths away and plain bilinear aliases
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for how in ("tokenizer", "release"):
        assert _run(tiny_tokenizer_dir, tmp_path / how, tmp_path / "clips", inputs / "photos",
                    extra=("--video-resize", how)) == 0
    frames = list(read_video(str(tmp_path / "clips" / "fine.mkv"), "fine.mkv", 1, "clips"))
    resized = [to_value_range(resize_square(p.pixels, tiny_tokenizer.image_size, "release_video").clamp(0, 1),
                              tiny_tokenizer.config.value_range) for p in frames]
    want = np.concatenate([tiny_tokenizer.encode_pixels(torch.stack(resized[i : i + 2])).numpy()
                           for i in range(0, len(resized), 2)])  # the run's batches of 2
    got = {how: _samples(tmp_path / how / "clips-vid-000000.tar") for how in ("tokenizer", "release")}
    assert [_tokens(got["release"][p.key]["tokens.npy"]).tolist() for p in frames] == want.tolist()
    assert any(got["release"][key]["tokens.npy"] != got["tokenizer"][key]["tokens.npy"] for key in got["release"])
    for shard in ("photos-img-000000.tar",):  # images keep the tokenizer's resize
        assert (tmp_path / "release" / shard).read_bytes() == (tmp_path / "tokenizer" / shard).read_bytes()
    # the setting is part of a shard's fingerprint; left at its default it is left out, so shards made before the
    # option existed are still complete
    reports = {how: json.loads((tmp_path / how / "clips-vid-000000.report.json").read_text()) for how in got}
    assert reports["release"]["fingerprint"] != reports["tokenizer"]["fingerprint"]
    release = Options(video_resize="release")
    assert "video_resize" not in Options().fingerprinted(videos=True) and release.fingerprinted(True)["video_resize"] == "release"
    # image shards: the option changes nothing, so a run with it keeps image shards made without it
    image_reports = [json.loads((tmp_path / how / "photos-img-000000.report.json").read_text()) for how in got]
    assert image_reports[0]["fingerprint"] == image_reports[1]["fingerprint"]
    assert parse_args(["--shards", "in/"]).options == Options()  # the default: the tokenizer's own resize
    with pytest.raises(TokenizeError, match=r"--video-resize: 'cv2', choose from tokenizer, release"):
        Options(video_resize="cv2")


def test_equally_named_videos_of_two_roots_stay_two_videos(inputs, tiny_tokenizer_dir, tmp_path):
    """ds1/clip.mp4 and ds2/clip.mp4: the sentence builders group frames by `video`, which must tell them apart."""
    (tmp_path / "other").mkdir()
    _video(tmp_path / "other" / "a.mp4", 3)
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, inputs / "clips", tmp_path / "other") == 0
    videos = {json.loads(sample["json"])["video"] for shard in ("clips-vid-000000", "other-vid-000000")
              for sample in _samples(out / f"{shard}.tar").values()}
    assert videos == {"clips/a", "clips/b", "other/a"}


U = 0x10000  # 1.0 in the display matrix's 16.16 fixed point


@pytest.mark.parametrize(
    "matrix, shown",
    [
        ((0, U, -U, 0), ("top", "right")),  # a phone held upright: a clockwise turn (PyAV's rotation -90)
        ((-U, 0, 0, U), ("right", "top")),  # a front camera's mirror (PyAV's rotation -180: not a turn)
        ((U, 0, 0, -U), ("left", "bottom")),  # a vertical mirror (PyAV's rotation 0)
        ((0, U, U, 0), ("top", "left")),  # a clockwise turn and a mirror
    ],
)
def test_a_turned_or_mirrored_video_is_tokenized_as_players_show_it(matrix, shown, tiny_tokenizer_dir, tmp_path):
    """Stored: red on the left half, green on the top half; the track header's display matrix says how to show it
    (a display point is [x y] @ [[a, b], [c, d]])."""
    (tmp_path / "phone").mkdir()
    with av.open(str(tmp_path / "phone" / "v.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        pixels = np.zeros((32, 64, 3), np.uint8)
        pixels[:, :32, 0] = 255
        pixels[:16, :, 1] = 255
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    data = bytearray((tmp_path / "phone" / "v.mp4").read_bytes())
    at = data.find(b"tkhd") - 4 + 48  # the track header's 3x3 matrix (version 0 layout)
    a, b, c, d = matrix
    data[at : at + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    (tmp_path / "phone" / "v.mp4").write_bytes(data)
    (frame,) = read_video(str(tmp_path / "phone" / "v.mp4"), "v.mp4", 1, "phone")
    height, width = frame.pixels.shape[1:]
    sides = {"top": np.s_[: height // 4], "bottom": np.s_[-height // 4 :],
             "left": np.s_[:, : width // 4], "right": np.s_[:, -width // 4 :]}
    for channel, side in zip((0, 1), shown):
        assert frame.pixels[channel][sides[side]].mean() > 0.9, (channel, side)
        opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[side]
        assert frame.pixels[channel][sides[opposite]].mean() < 0.1, (channel, opposite)
    assert (width, height) == ((32, 64) if matrix[0] == 0 else (64, 32))
    if matrix == (0, U, -U, 0):
        assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "phone") == 0
        meta = json.loads(_samples(tmp_path / "out" / "phone-vid-000000.tar")["v/000000"]["json"])
        assert (meta["width"], meta["height"]) == (32, 64)


def test_corrupt_inputs_are_skipped_counted_and_reported(tmp_path, tiny_tokenizer_dir, capsys):
    good, bad_jpeg = _jpeg(32, 32), _jpeg(64, 64)[:200]
    src = tmp_path / "src"
    src.mkdir()
    _write_tar(src / "a.tar", [("k1.jpg", good), ("k2.jpg", bad_jpeg), ("k3.jpg", b""), ("k4.json", b"{}"),
                               ("k5.jpg", good), ("k6.jpg", good)])
    with tarfile.open(src / "a.tar") as tar:
        cut = tar.getmember("k5.jpg").offset_data + 100
    (src / "b.tar").write_bytes((src / "a.tar").read_bytes()[:cut])  # cut inside k5: k1..k4 survive
    with tarfile.open(src / "a.tar") as tar:
        between = tar.getmember("k5.jpg").offset
    (src / "e.tar").write_bytes((src / "a.tar").read_bytes()[:between])  # cut between k4 and k5: tarfile sees no damage
    (src / "c.tar").write_bytes(b"")
    (src / "d.tar").write_bytes(b"this is no tar file at all" * 40)
    (src / "img").mkdir()
    (src / "img" / "ok.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (src / "img" / "garbage.png").write_bytes(b"\x89PNG not really")
    (src / "img" / "empty.jpg").write_bytes(b"")
    (src / "vid").mkdir()
    (src / "vid" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 500)
    (src / "vid" / "empty.avi").write_bytes(b"")
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, src, extra=("--images-per-shard", "10")) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("tokenize: 6 images tokenized (+0 derived) in 7 shards (0 already complete); skipped 17: "
                              "corrupt_image 4, corrupt_tar 3, empty_file 6, no_image 3, unreadable_video 1; "
                              "96 tokens written; wall ")
    reports = {p.name: json.loads(p.read_text()) for p in out.glob("*.report.json")}
    a = reports["a.report.json"]
    assert (a["images"], a["skipped"]) == (3, {"corrupt_image": 1, "empty_file": 1, "no_image": 1})
    assert [(s["item"].split(":")[-1], s["reason"]) for s in a["skipped_items"]] == [
        ("k2.jpg", "corrupt_image"), ("k3.jpg", "empty_file"), ("k4", "no_image")]
    assert (reports["b.report.json"]["images"], reports["b.report.json"]["skipped"]) == (
        1, {"corrupt_image": 1, "corrupt_tar": 1, "empty_file": 1, "no_image": 1})
    assert reports["c.report.json"]["skipped"] == {"empty_file": 1}
    assert reports["d.report.json"]["skipped"] == {"corrupt_tar": 1}
    assert (reports["e.report.json"]["images"], reports["e.report.json"]["skipped"]) == (
        1, {"corrupt_image": 1, "corrupt_tar": 1, "empty_file": 1, "no_image": 1})
    assert reports["e.report.json"]["skipped_items"][-1]["detail"].startswith("cut short between members")
    assert reports["src-img-000000.report.json"]["skipped"] == {"corrupt_image": 1, "empty_file": 1}
    assert reports["src-vid-000000.report.json"]["skipped"] == {"empty_file": 1, "unreadable_video": 1}
    assert list(_samples(out / "b.tar")) == ["k1"] and _samples(out / "c.tar") == {}
    # Resumed after shard a was lost: the last line still counts what every shard left out, this run's and earlier.
    (out / "a.tar").unlink()
    assert _run(tiny_tokenizer_dir, out, src, extra=("--images-per-shard", "10")) == 0
    assert "(6 already complete, 3 images); skipped 17: corrupt_image 4, corrupt_tar 3, empty_file 6, no_image 3, " \
           "unreadable_video 1 (14 of them in shards completed by earlier runs); " in capsys.readouterr().out


def test_duplicate_keys_corrupt_frames_and_unreadable_files_are_skipped(tmp_path, tiny_tokenizer_dir, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    _write_tar(src / "a.tar", [("k1.jpg", _jpeg(32, 32)), ("k2.jpg", _jpeg(32, 32)), ("k1.jpg", _jpeg(32, 32))])
    # a member repeated in a row: the copy is skipped, the samples after it are kept
    _write_tar(src / "b.tar", [("k1.jpg", _jpeg(32, 32)), ("k1.jpg", _jpeg(32, 32)), ("k2.jpg", _jpeg(32, 32))])
    (src / "img").mkdir()
    for name in ("x.v2.png", "x_v2.png", "y.png", "z.png"):  # x.v2 and x_v2 both have the key x_v2
        (src / "img" / name).write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (src / "vid").mkdir()
    _video(src / "vid" / "cut.mkv", 6, codec="ffv1", options={"slicecrc": "1", "level": "3"})
    data = bytearray((src / "vid" / "cut.mkv").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xff" * 40  # damage in the 2nd frame's checksummed slices
    (src / "vid" / "cut.mkv").write_bytes(bytes(data))
    _video(src / "vid" / "latin.mkv", 2, codec="ffv1", title="TITLE_PLACEHOLDER")  # metadata that is not UTF-8
    latin = (src / "vid" / "latin.mkv").read_bytes()
    (src / "vid" / "latin.mkv").write_bytes(latin.replace(b"TITLE_PLACEHOLDER", "Caf\xe9 \xe0 Gen\xe8ve....".encode("latin-1")))
    find_units_ = pipeline.find_units

    def listed_then_unreadable(*args, **kwargs):  # z.png turns into a folder between listing and reading
        units = find_units_(*args, **kwargs)
        (src / "img" / "z.png").unlink()
        (src / "img" / "z.png").mkdir()
        return units

    monkeypatch.setattr(pipeline, "find_units", listed_then_unreadable)
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, src) == 0
    reports = {p.name: json.loads(p.read_text()) for p in out.glob("*.report.json")}
    assert (reports["a.report.json"]["images"], reports["a.report.json"]["skipped"]) == (2, {"duplicate_key": 1})
    assert list(_samples(out / "a.tar")) == ["k1", "k2"]  # the first k1 is kept
    assert (reports["b.report.json"]["images"], reports["b.report.json"]["skipped"]) == (2, {"duplicate_key": 1})
    assert list(_samples(out / "b.tar")) == ["k1", "k2"]
    images = reports["src-img-000000.report.json"]
    assert (images["images"], images["skipped"]) == (2, {"duplicate_key": 1, "unreadable_file": 1})
    assert [(s["item"], s["reason"]) for s in images["skipped_items"]] == [
        (f"{src}/img/x_v2.png:img/x_v2", "duplicate_key"), (str(src / "img" / "z.png"), "unreadable_file")]
    assert images["skipped_items"][0]["detail"] == f"{src}/img/x.v2.png has the key"  # the other file, named
    videos = reports["src-vid-000000.report.json"]
    assert videos["skipped"] == {"corrupt_video": 1}
    assert [s["item"] for s in videos["skipped_items"]] == [f"{src}/vid/cut.mkv#frame=1"]
    assert videos["skipped_items"][0]["detail"].startswith("1 undecodable packet(s), first: ")
    # the damaged frame is lost, the frames after it are kept under their own numbers
    assert list(_samples(out / "src-vid-000000.tar")) == [
        *(f"vid/cut/{n:06d}" for n in (0, 2, 3, 4, 5)), "vid/latin/000000", "vid/latin/000001"]


def test_links_back_to_an_ancestor_folder_list_each_image_once(tmp_path, tiny_tokenizer_dir):
    photos = tmp_path / "photos"
    (photos / "cats").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (photos / "cats" / name).write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (photos / "cats" / "up").symlink_to("..")  # alone, it listed every image ~40 times (ELOOP depth)
    assert [i.rel for u in find_units([str(photos)])[0] for i in u.items] == ["cats/a.png", "cats/b.png"]
    (photos / "cats" / "parent").symlink_to("..")  # with a second one, the listing doubled per level: a hang
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, photos) == 0
    assert list(_samples(out / "photos-img-000000.tar")) == ["cats/a", "cats/b"]


def test_a_matroska_video_cut_short_is_reported_with_where_it_ends(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    _video(src / "full.mkv", 40, codec="ffv1")  # 10 fps: 4.0 s
    data = (src / "full.mkv").read_bytes()
    (src / "cut.mkv").write_bytes(data[: len(data) * 6 // 10])  # an interrupted download: the header still says 4.0 s
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, src, extra=("--video-stride", "8")) == 0
    report = json.loads((out / "src-vid-000000.report.json").read_text())
    assert report["skipped"] == {"corrupt_video": 1}  # the uncut copy: none
    (skip,) = report["skipped_items"]
    kept = sum(key.startswith("cut/") for key in _samples(out / "src-vid-000000.tar"))
    assert skip["item"].startswith(f"{src}/cut.mkv#frame=") and 2 <= kept < 5
    assert re.fullmatch(r"ends at [12]\.\d s of 4\.0 s", skip["detail"])

def _tar_entries(path: Path) -> list[tuple[str, str]]:
    """What read_batches makes of a tar: (key, caption) of each picture, (item name, reason) of each skip."""
    (unit,), _ = find_units([str(path)])
    entries = []
    for rows, skips, _last in read_batches(unit, DecodeOptions(), 8, lambda p: (p.key, p.meta.get("caption", ""))):
        entries += rows + [(Path(s.item).name.rsplit(":", 1)[-1], s.reason) for s in skips]
    return entries


def test_tar_members_not_adjacent_are_a_split_sample_not_a_missing_image(tmp_path):
    members = [(f"{k}.{ext}", _jpeg(8, 8) if ext == "jpg" else b"cap " + k.encode())
               for ext in ("jpg", "txt") for k in ("a", "b")]  # what `tar cf s.tar *.jpg *.txt` writes
    _write_tar(tmp_path / "s.tar", [*members, ("a.jpg", _jpeg(8, 8))])  # and a repeated key: a duplicate
    assert _tar_entries(tmp_path / "s.tar") == [
        ("a", ""), ("b", ""), ("a", "split_sample"), ("b", "split_sample"), ("a", "duplicate_key")]
    (unit,), _ = find_units([str(tmp_path / "s.tar")])
    skip = next(s for _, skips, _ in read_batches(unit, DecodeOptions(), 8, str) for s in skips)
    assert skip.detail == "members of sample a are not adjacent in the tar (txt left out); write it in key order, " \
        "e.g. tar --sort=name"


def test_a_tar_with_its_captions_before_its_images_keeps_every_image_with_its_caption(tmp_path):
    """`tar cf s.tar *.json *.jpg` lost every image: each key's json was a `no_image` at once, its image then a
    `split_sample` (review 45 #3). A sample with no image at all is still `no_image`, at the end of the tar."""
    members = [(f"{k}.{ext}", _jpeg(8, 8) if ext == "jpg" else b"cap " + k.encode())
               for ext in ("txt", "jpg") for k in ("a", "b")] + [("c.txt", b"cap c")]
    _write_tar(tmp_path / "s.tar", members)
    assert _tar_entries(tmp_path / "s.tar") == [("a", "cap a"), ("b", "cap b"), ("c", "no_image")]


def test_a_tar_key_with_a_dot_says_why_it_has_no_image(tmp_path):
    """webdataset cuts a member name at its first dot: `photo.v2.jpg` is key `photo`, member `v2.jpg`."""
    _write_tar(tmp_path / "s.tar", [("photo.v2.jpg", _jpeg(8, 8)), ("plain.jpg", _jpeg(8, 8))])
    (unit,), _ = find_units([str(tmp_path / "s.tar")])
    (skip,) = [s for _, skips, _ in read_batches(unit, DecodeOptions(), 8, str) for s in skips]
    assert (skip.reason, skip.detail) == ("no_image", "members: v2.jpg (a member name with a dot: the key ends at "
                                                      "the first dot, as in webdataset; name it photo_v2.jpg)")


def test_a_second_image_member_of_a_tar_sample_is_a_duplicate_key(tmp_path):
    _write_tar(tmp_path / "s.tar", [("x.jpg", _jpeg(8, 8)), ("x.png", _png(np.zeros((8, 8, 3), np.uint8))),
                                    ("x.txt", b"cap")])
    assert _tar_entries(tmp_path / "s.tar") == [("x", "cap"), ("x.png", "duplicate_key")]


def test_an_image_stored_as_a_tar_link_is_reported_once_not_lost_silently(tmp_path):
    """Tars of deduplicated folders store repeated files as links; webdataset's reader passed them over, so a
    hard-linked image with a json was a `no_image` and a symlinked one vanished from the report (review 45 #10)."""
    jpeg = _jpeg(8, 8)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("a.jpg", jpeg), ("a.json", b'{"k": 1}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in [("b.jpg", tarfile.LNKTYPE), ("c.jpg", tarfile.SYMTYPE), ("d.v2.jpg", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.jpg"
            tar.addfile(info)
        info = tarfile.TarInfo("b.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert _tar_entries(tmp_path / "s.tar") == [("a", ""), ("b.jpg", "tar_link"), ("c.jpg", "tar_link"),
                                                ("d.v2.jpg", "tar_link")]  # a dotted name too (review 57 #7)
    (unit,), _ = find_units([str(tmp_path / "s.tar")])
    details = [s.detail for _, skips, _ in read_batches(unit, DecodeOptions(), 8, str) for s in skips]
    assert details == ["a hard link to a.jpg: links are not read (tar -h / --hard-dereference stores the file)"] + [
        "a symbolic link to a.jpg: links are not read (tar -h / --hard-dereference stores the file)"] * 2


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_a_compressed_tar_named_tar_is_read_and_a_cut_one_is_corrupt(tmp_path, compress):
    _write_tar(tmp_path / "plain", [(f"k{i}.jpg", _jpeg(8, 8)) for i in range(3)])
    packed = __import__(compress).compress((tmp_path / "plain").read_bytes())
    (tmp_path / "whole.tar").write_bytes(packed)
    assert _tar_entries(tmp_path / "whole.tar") == [("k0", ""), ("k1", ""), ("k2", "")]
    (tmp_path / "cut.tar").write_bytes(packed[: len(packed) * 3 // 4])
    assert _tar_entries(tmp_path / "cut.tar")[-1] == ("cut.tar", "corrupt_tar")


@pytest.mark.parametrize("fmt,orientation", [("JPEG", 3), ("JPEG", 6), ("PNG", 6), ("WEBP", 6), ("TIFF", 6), ("TIFF", 8)])
def test_exif_orientation_gives_the_displayed_size_in_every_format(fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(buffer, fmt, exif=exif)  # stored 60 wide, 40 high
    picture = decode_image(buffer.getvalue(), "x", "x", {}, DecodeOptions())
    width, height = (60, 40) if orientation == 3 else (40, 60)
    assert (picture.meta["width"], picture.meta["height"], *picture.pixels.shape[1:]) == (width, height, height, width)


def test_a_folder_that_cannot_be_listed_is_a_counted_skip(tmp_path, tiny_tokenizer_dir, capsys, deny_listing):
    src = tmp_path / "src"
    for name in ("ok/a.png", "locked/b.png", "locked/c.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    deny_listing(src / "locked")
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, src) == 0
    assert "tokenize: 1 images tokenized (+0 derived) in 1 shards (0 already complete); skipped 1: unreadable_folder 1;" \
        in capsys.readouterr().out
    report = json.loads((out / "src-img-000000.report.json").read_text())
    assert report["skipped_items"] == [
        {"item": str(src / "locked"), "reason": "unreadable_folder", "detail": "PermissionError: Permission denied"}]
    deny_listing(src)  # the folder given itself: an error, not a skip
    assert _run(tiny_tokenizer_dir, out, src) == 2
    assert capsys.readouterr().err.strip() == f"error: {src}: cannot list the folder (permission denied)"


def test_read_batches_prepares_each_key_once_and_ends_with_a_last_batch(tmp_path):
    for name in ("a.png", "a.jpg", "b.png", "c.png", "d.png"):  # a.jpg and a.png share the key "a"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (unit,), _ = find_units([str(tmp_path)])
    batches = [
        (rows, [(Path(s.item).name, s.reason) for s in skips], last)
        for rows, skips, last in read_batches(unit, DecodeOptions(), 2, lambda picture: picture.key.upper())
    ]
    first = unit.items[0].rel  # which of a.jpg / a.png is read first is find_units' order; the other is the duplicate
    duplicate = "a.png:a" if first == "a.jpg" else "a.jpg:a"
    assert batches == [
        (["A", "B"], [(duplicate, "duplicate_key")], False),
        (["C", "D"], [("bad.png", "corrupt_image")], False),
        ([], [], True),
    ]


@pytest.mark.parametrize(
    "shards,message",
    [
        (["{src}/none/{{0..3}}.tar"], "error: {src}/none/{{0..3}}.tar: matches no tar shard, image or video file"),
        (["{src}/missing.tar"], "error: {src}/missing.tar: no such file or directory"),
        (["{src}/notes"], "error: {src}/notes: matches no tar shard, image or video file"),
    ],
)
def test_empty_shards_fail_with_one_line_before_any_work(tmp_path, tiny_tokenizer_dir, capsys, shards, message):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, *[s.format(src=tmp_path) for s in shards]) == 2
    assert capsys.readouterr().err.strip() == message.format(src=tmp_path)
    assert not out.exists()


def test_out_among_the_inputs_fails_with_one_line_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    data = tmp_path / "laion"
    data.mkdir()
    _write_tar(data / "00000.tar", [("k.jpg", _jpeg(8, 8))])
    monkeypatch.chdir(data)  # the default --out, tokens/laion, is inside the data folder
    with pytest.raises(SystemExit, match="2"):
        main(["--shards", ".", "--tokenizer", str(tmp_path / "nope")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: tokens/laion: --out is inside the input folder . (without " \
        "--out: run from outside the data, or give one); a rerun would read its token shards as inputs"
    (data / "tokens").mkdir()
    _write_tar(data / "tokens" / "00000.tar", [("k.jpg", _jpeg(8, 8))])  # a first run's shard, found by a glob
    (data / "tokens" / "00000.report.json").write_text("{}")
    assert _run(tmp_path / "nope", data / "tokens", f"{data}/**/*.tar") == 2
    assert capsys.readouterr().err.strip() == f"error: {data / 'tokens'}: --shards found a token shard of --out " \
        f"({data / 'tokens' / '00000.tar'}): token shards would be read as inputs; choose an --out outside the inputs"
    assert not (data / "tokens" / "laion").exists()


def test_raw_tars_under_out_are_inputs_like_any_other(tiny_tokenizer_dir, tmp_path, capsys):
    """`--shards data/raw --out data`: the shards go to data/<name>.tar, and a rerun reads only data/raw again."""
    (tmp_path / "data" / "raw").mkdir(parents=True)
    _write_tar(tmp_path / "data" / "raw" / "00000.tar", [("k.jpg", _jpeg(8, 8))])
    for _ in range(2):
        assert _run(tiny_tokenizer_dir, tmp_path / "data", tmp_path / "data" / "raw") == 0
    assert "(1 already complete, 1 images)" in capsys.readouterr().out.splitlines()[-1]
    assert (tmp_path / "data" / "00000.tar").is_file()


def test_wrong_tokenizer_fails_with_one_line_before_any_work(inputs, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    assert _run(tmp_path / "nope", tmp_path / "out", inputs / "laion") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such file or directory"
    assert _run(tmp_path / "tok", tmp_path / "out", inputs / "laion") == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {tmp_path / 'tok'}: no config.json")
    assert not (tmp_path / "out").exists()


def test_label_maps_are_coloured_through_the_palette(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    labels = (np.arange(48 * 40).reshape(48, 40) // 97 % 7).astype(np.uint8)
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "x.png").write_bytes(_png(labels))
    (tmp_path / "seg" / "colour.png").write_bytes(_png(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "seg", extra=("--label-palette",)) == 0
    samples = _samples(tmp_path / "out" / "seg-img-000000.tar")
    assert list(samples) == ["x"]
    expected = tiny_tokenizer.encode([colour_labels(labels, label_palette())]).numpy()[0]
    assert np.array_equal(_tokens(samples["x"]["tokens.npy"]), expected)
    assert json.loads(samples["x"]["json"])["label_palette"] == "lvm-segmentation-palette-v1"
    report = json.loads((tmp_path / "out" / "seg-img-000000.report.json").read_text())
    assert report["skipped"] == {"not_label_map": 1}


def test_same_inputs_give_byte_identical_shards_with_worker_processes(inputs, reference, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--shards", *map(str, _all_inputs(inputs)), "--out", str(out), "--tokenizer", str(tiny_tokenizer_dir)]
    assert main([*args, "--workers", "2", "--batch-size", "2", *REFERENCE_OPTIONS]) == 0
    assert _tree(out) == _tree(reference)  # tars and reports, byte for byte


def test_missing_shards_of_a_brace_pattern_are_one_warning_naming_the_first(inputs, tiny_tokenizer_dir, tmp_path, capsys):
    assert _run(tiny_tokenizer_dir, tmp_path / "out", f"{inputs}/laion/{{00000..00004}}.tar") == 0  # 3 of 5 exist
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {inputs}/laion/00003.tar: named by --shards, does not exist (1 more such)"]


def test_a_batch_is_written_while_the_next_one_encodes(inputs, tiny_tokenizer_dir, tmp_path, monkeypatch):
    """The loop queues batch i+1 on the encoder before it writes batch i's codes, so a GPU never waits for the
    writing; every batch is still written, in order."""
    order = []
    start, finish, add = pipeline.Encoder.start, pipeline.Encoder.finish, ShardWriter.add
    monkeypatch.setattr(pipeline.Encoder, "start", lambda self, pixels: (order.append("encode"), start(self, pixels))[1])
    monkeypatch.setattr(pipeline.Encoder, "finish", staticmethod(lambda started: (order.append("codes"), finish(started))[1]))
    monkeypatch.setattr(ShardWriter, "add", lambda self, *args: (order.append("write"), add(self, *args))[1])
    assert _run(tiny_tokenizer_dir, tmp_path / "out", inputs / "laion" / "00000.tar") == 0  # 3 images, batches of 2
    assert order == ["encode", "encode", "codes", "write", "write", "codes", "write"]


def test_crash_mid_shard_then_rerun_equals_an_uninterrupted_run(inputs, reference, tiny_tokenizer_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    add = ShardWriter.add

    def crash_on_the_fifth_image(self, *args, **kwargs):
        crash_on_the_fifth_image.calls += 1
        if crash_on_the_fifth_image.calls == 5:  # second shard, second image: one shard done, one half-written
            raise KeyboardInterrupt
        return add(self, *args, **kwargs)

    crash_on_the_fifth_image.calls = 0
    monkeypatch.setattr(ShardWriter, "add", crash_on_the_fifth_image)
    assert _run(tiny_tokenizer_dir, out, *_all_inputs(inputs), extra=REFERENCE_OPTIONS) == 130  # "interrupted"
    monkeypatch.setattr(ShardWriter, "add", add)
    assert sorted(p.name for p in out.iterdir()) == ["00000.report.json", "00000.tar", "00001.tar.tmp"]
    # A crash between the report's rename and the tar's: a report without its tar must be redone too.
    (out / "00002.report.json").write_text((reference / "00002.report.json").read_text())
    assert _run(tiny_tokenizer_dir, out, *_all_inputs(inputs), extra=REFERENCE_OPTIONS) == 0
    assert _tree(out) == _tree(reference)  # no duplicate, no gap, no leftover temporary file


KILL_MOMENTS = {  # kill -9 as soon as (or later, on a slow machine) the output folder holds ...
    "first shard being written": lambda out: any(out.glob("*.tar*")),
    "one shard committed": lambda out: any(out.glob("*.report.json")),
    "three shards committed": lambda out: len(list(out.glob("*.report.json"))) >= 3,
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_run(inputs, reference, tiny_tokenizer_dir, tmp_path, moment):
    out = tmp_path / "out"
    args = ["--shards", *map(str, _all_inputs(inputs)), "--out", str(out), "--tokenizer", str(tiny_tokenizer_dir),
            "--workers", "1", "--batch-size", "2", *REFERENCE_OPTIONS]
    process = subprocess.Popen([sys.executable, "-m", "lvm.tokenize", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not KILL_MOMENTS[moment](out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the job ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert main([*args, "--workers", "0"]) == 0
    assert _tree(out) == _tree(reference)


def test_ranks_split_the_shards_and_a_stopped_rank_resumes(inputs, reference, tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank, extra in ((0, ()), (1, ("--max-shards", "1")), (1, ())):  # rank 1 stops after one shard, then reruns
        monkeypatch.setenv("RANK", str(rank))
        assert _run(tiny_tokenizer_dir, out, *_all_inputs(inputs), extra=(*REFERENCE_OPTIONS, *extra)) == 0
        written.append({p.name for p in out.glob("*.tar")} - set().union(*written))
    assert written == [{"00000.tar", "00002.tar", "photos-img-000000.tar"}, {"00001.tar"},
                       {"clips-vid-000000.tar", "photos-img-000001.tar"}]
    assert "in 2 shards (1 already complete, 3 images)" in capsys.readouterr().out.splitlines()[-1]
    assert _tree(out) == _tree(reference)


def test_other_settings_redo_complete_shards(inputs, reference, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, inputs / "laion") == 0
    assert "gray.tokens.npy" not in _samples(out / "00000.tar")["000000000"]
    capsys.readouterr()
    assert _run(tiny_tokenizer_dir, out, inputs / "laion", extra=REFERENCE_OPTIONS) == 0
    captured = capsys.readouterr()
    assert "3 made with other settings or inputs (redone)" in captured.err
    assert "in 3 shards (0 already complete)" in captured.out
    for shard in ("00000", "00001", "00002"):
        assert (out / f"{shard}.tar").read_bytes() == (reference / f"{shard}.tar").read_bytes()


def test_an_image_replaced_under_its_name_redoes_its_shard(tiny_tokenizer_dir, tiny_tokenizer, tmp_path, capsys):
    """The usual repair of a corrupt image is to fetch it again under the same name: its shard must be redone."""
    (tmp_path / "src").mkdir()
    for name in ("a", "b"):
        (tmp_path / "src" / f"{name}.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    out, extra = tmp_path / "out", ("--images-per-shard", "1")
    assert _run(tiny_tokenizer_dir, out, tmp_path / "src", extra=extra) == 0
    for image in (tmp_path / "src").iterdir():  # copied by tar or zip: modification times kept to the second only
        seconds = int(image.stat().st_mtime)
        os.utime(image, ns=(seconds * 10**9, seconds * 10**9))
    assert _run(tiny_tokenizer_dir, out, tmp_path / "src", extra=extra) == 0
    assert "in 0 shards (2 already complete, 2 images)" in capsys.readouterr().out.splitlines()[-1]
    white = np.full((64, 64, 3), 255, np.uint8)
    (tmp_path / "src" / "b.png").write_bytes(_png(white))
    assert _run(tiny_tokenizer_dir, out, tmp_path / "src", extra=extra) == 0
    captured = capsys.readouterr()
    assert "1 made with other settings or inputs (redone)" in captured.err and "(1 already complete, 1 images)" in captured.out
    tokens = _tokens(_samples(out / "src-img-000001.tar")["b"]["tokens.npy"])
    assert np.array_equal(tokens, tiny_tokenizer.encode([white]).numpy()[0])


def test_a_rerun_as_frame_folders_redoes_the_shards(tiny_tokenizer_dir, tmp_path, capsys):
    """--frame-folders adds `video` and `frame` to the json: the shards of a plain run must not pass for done."""
    (tmp_path / "seq" / "walk").mkdir(parents=True)
    for i in (0, 2, 10):
        (tmp_path / "seq" / "walk" / f"f{i}.png").write_bytes(_png(np.full((8, 8, 3), 20 * i, np.uint8)))
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, tmp_path / "seq") == 0
    capsys.readouterr()
    assert _run(tiny_tokenizer_dir, out, tmp_path / "seq", extra=("--frame-folders",)) == 0
    assert "in 1 shards (0 already complete)" in capsys.readouterr().out
    (shard,) = out.glob("*.tar")
    frames = {json.loads(s["json"])["path"]: json.loads(s["json"])["frame"] for s in _samples(shard).values()}
    assert frames == {"walk/f0.png": 0, "walk/f2.png": 1, "walk/f10.png": 2}


def test_a_new_mask_recipe_redoes_only_shards_with_masked_images(inputs, tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    plain, masked = tmp_path / "plain", tmp_path / "masked"
    assert _run(tiny_tokenizer_dir, plain, inputs / "laion") == 0
    assert _run(tiny_tokenizer_dir, masked, inputs / "laion", extra=("--derive", "masked")) == 0
    capsys.readouterr()
    monkeypatch.setattr("lvm.tokenize.pipeline.MASK_RECIPE", 999)
    assert _run(tiny_tokenizer_dir, plain, inputs / "laion") == 0
    assert "in 0 shards (3 already complete, 9 images)" in capsys.readouterr().out
    assert _run(tiny_tokenizer_dir, masked, inputs / "laion", extra=("--derive", "masked")) == 0
    assert "3 made with other settings or inputs (redone)" in capsys.readouterr().err


def test_a_rerun_killed_between_report_and_rename_redoes_the_shard(tmp_path, monkeypatch):
    """A shard made with other settings, its rerun killed after the new report: the old tar must not pass for done."""
    tokens = {"original": np.zeros(4, np.uint16)}
    first = ShardWriter(tmp_path, "u0", ["a.png"], "old settings")
    first.add("a", b"{}", tokens)
    first.commit()

    def killed_after_the_report(self, path, fields):
        original_write_report(self, path, fields)
        raise KeyboardInterrupt("killed")

    original_write_report = ShardWriter.write_report
    monkeypatch.setattr(ShardWriter, "write_report", killed_after_the_report)
    rerun = ShardWriter(tmp_path, "u0", ["a.png"], "new settings")
    rerun.add("a", b"{}", {"original": np.ones(4, np.uint16)})
    with pytest.raises(KeyboardInterrupt):
        rerun.commit()
    assert shard_state(tmp_path, "u0", "new settings") == "missing"


def test_shards_left_by_a_finer_split_of_the_same_folder_are_refused(inputs, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, inputs / "photos", extra=("--images-per-shard", "2")) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"photos-img-00000{n}.tar" for n in range(3)]
    capsys.readouterr()
    assert _run(tiny_tokenizer_dir, out, inputs / "photos", extra=("--images-per-shard", "3")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out / 'photos-img-000002.tar'}: left by an earlier run that cut the same inputs into more shards "
        "(1 such); the sentence builder would read their images twice: remove them or choose another --out"
    )
    (out / "photos-img-000002.tar").unlink()
    assert _run(tiny_tokenizer_dir, out, inputs / "photos", extra=("--images-per-shard", "3")) == 0


def test_a_tokenizer_with_other_weights_redoes_complete_shards(inputs, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    tiny_tokenizer.save(tmp_path / "tok")
    assert _run(tmp_path / "tok", out, inputs / "laion") == 0
    before = _tokens(_samples(out / "00000.tar")["000000000"]["tokens.npy"])
    retrained = tokenizer.load(tmp_path / "tok")
    with torch.no_grad():  # same config, other weights: code i moves to index i + 1
        retrained.quantize.embedding.weight.copy_(retrained.quantize.embedding.weight.roll(1, 0))
    retrained.save(tmp_path / "tok")
    capsys.readouterr()
    assert _run(tmp_path / "tok", out, inputs / "laion") == 0
    assert "3 made with other settings or inputs (redone)" in capsys.readouterr().err
    assert np.array_equal(_tokens(_samples(out / "00000.tar")["000000000"]["tokens.npy"]), (before + 1) % 8192)


def test_ranks_come_from_torchrun_else_slurm(inputs, tiny_tokenizer_dir, tmp_path, monkeypatch):
    assert ranks_from_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert ranks_from_env() == (1, 2, 1)
    assert _run(tiny_tokenizer_dir, tmp_path / "out", inputs / "laion") == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00001.tar"]  # task 1 of 2: the middle shard
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ranks_from_env() == (0, 3, 0)  # torchrun's variables win
    for rank, world, message in (("3", "2", "RANK=3, WORLD_SIZE=2: need 0 <= RANK < WORLD_SIZE"),  # did nothing, exit 0
                                 ("0", "0", "RANK=0, WORLD_SIZE=0: need 0 <= RANK < WORLD_SIZE"),
                                 ("x", "2", "RANK='x', WORLD_SIZE='2', LOCAL_RANK='0': not whole numbers")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            ranks_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(UserError, match="^LOCAL_RANK=-1: need 0 or more$"):
        ranks_from_env()


def test_jpeg_draft_decodes_large_jpegs_smaller_and_keeps_the_displayed_size(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    (tmp_path / "big").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 128 wide, 256 high
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (128, 256, 3), dtype=np.uint8)).save(buffer, "JPEG", exif=exif)
    (tmp_path / "big" / "r.jpg").write_bytes(buffer.getvalue())
    for extra in ((), ("--jpeg-draft",)):
        out = tmp_path / f"out{len(extra)}"
        assert _run(tiny_tokenizer_dir, out, tmp_path / "big", extra=extra) == 0
        sample = _samples(out / "big-img-000000.tar")["r"]
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == (128, 256)
        image = Image.open(io.BytesIO(buffer.getvalue()))
        if extra:
            image.draft(None, (64, 64))  # libjpeg decodes at 1/2 scale: 128x64 before rotation
            assert image.size == (128, 64)
        expected = tiny_tokenizer.encode([ImageOps.exif_transpose(image)]).numpy()[0]
        assert np.array_equal(_tokens(sample["tokens.npy"]), expected)


def test_units_are_named_from_file_names_alone(inputs, tmp_path):
    brace, missing = find_units([f"{inputs}/laion/{{00000..00004}}.tar"])
    assert [u.name for u in brace] == ["00000", "00001", "00002"]
    assert missing == [f"{inputs}/laion/00003.tar", f"{inputs}/laion/00004.tar"]
    assert find_units([f"{inputs}/laion/*.tar"])[0] == brace == find_units([str(inputs / "laion")])[0]
    nested = find_units([f"{inputs}/*"], images_per_shard=4, videos_per_shard=1)[0]
    root = inputs.name  # images and videos of the root `inputs`, tars by their path below it
    assert [u.name for u in nested] == [f"{root}-img-000000", f"{root}-img-000001", f"{root}-vid-000000",
                                        f"{root}-vid-000001", "laion/00000", "laion/00001", "laion/00002"]
    assert [i.rel for i in nested[1].items] == ["photos/dogs/tiny.webp", "photos/top.v2.jpg"]
    for folder in ("a/x", "b/x"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "1.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(TokenizeError, match=r"1.png: writes the same output shard x-img-000000.tar as .*b/x/1.png"):
        find_units([str(tmp_path / "a" / "x"), str(tmp_path / "b" / "x")])


def test_every_spelling_of_a_folder_lists_each_file_once_under_its_relative_path(tmp_path, monkeypatch):
    """Relative paths are cut from the listed paths rather than computed by `os.path.relpath` (20 us a file); every
    spelling of the same folder gives the same items, and a folder named twice (`d ./d`) gives each file once."""
    for rel in ("b/f10.png", "b/f2.png", "top.png", "b/c/x.png"):
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / rel).write_bytes(_png(np.zeros((4, 4), np.uint8)))
    monkeypatch.chdir(tmp_path)
    expected = [("d/b/c/x.png", "b/c/x.png", 0), ("d/b/f10.png", "b/f10.png", 1), ("d/b/f2.png", "b/f2.png", 0),
                ("d/top.png", "top.png", 0)]

    def listed(*specs: str) -> list[tuple[str, str, int | None]]:
        units, _ = find_units(list(specs), frame_folders=True)
        return [(os.path.relpath(i.path), i.rel, i.frame) for u in units for i in u.items]  # where the file is

    for spec in ("d", "d/", "./d", "d//", "d/../d", "d/*", "d/**/*.png", str(tmp_path / "d")):
        assert listed(spec) == expected, spec
    assert listed("d", "./d", str(tmp_path / "d")) == expected  # each file once, not three times
    (tmp_path / "d" / "b" / "s.tar").write_bytes(b"")  # planning reads no tar
    assert [u.name for u in find_units(["d", "./d"])[0]] == ["b/s", "d-img-000000"]  # tars too, not a name clash
    (tmp_path / "d" / "b" / "s.tar").unlink()
    assert listed("d/*/../*.png") == [("d/top.png", "top.png", 0)]  # not "b/../top.png"
    monkeypatch.chdir(tmp_path / "d")
    for spec in (".", "./", "*", "**/*.png"):
        assert listed(spec) == [(rel, rel, frame) for _, rel, frame in expected], spec


def test_options_normalise_and_validate_derived_variants():
    assert Options(derive=("masked", "gray")).derive == ("gray", "masked")
    with pytest.raises(TokenizeError, match="unknown derived variant depth"):
        Options(derive=("depth",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_encoding_is_deterministic_and_close_to_the_cpu(inputs, reference, tiny_tokenizer_dir, tmp_path):
    """GPU counterpart of the CPU tests above: bfloat16 autocast may move near-tie codes, nothing else (a CUDA-only
    bug that encodes consistently wrong, a misread channels_last layout say, would be far off the CPU's tokens)."""
    for out in ("a", "b"):
        assert _run(tiny_tokenizer_dir, tmp_path / out, *_all_inputs(inputs), extra=(*REFERENCE_OPTIONS, "--device", "cuda")) == 0
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    tokens = _tokens(_samples(tmp_path / "a" / "00000.tar")["000000000"]["tokens.npy"])
    assert tokens.dtype == np.uint16 and tokens.shape == (16,) and tokens.max() < 8192
    same = total = 0
    for shard in sorted(reference.glob("*.tar")):
        cpu, cuda = _samples(shard), _samples(tmp_path / "a" / shard.name)
        assert sorted(cpu) == sorted(cuda)
        for key, members in cpu.items():
            for name, data in members.items():
                if name.endswith(".npy"):
                    same += int((_tokens(data) == _tokens(cuda[key][name])).sum())
                    total += _tokens(data).size
    assert total > 0 and same / total > 0.9, same / total  # 96% in a bfloat16 simulation on the CPU


def _painted(index: int) -> np.ndarray:
    """A frame that shows its own index in 6 bands (white = bit set), which any codec keeps readable."""
    pixels = np.zeros((48, 96, 3), np.uint8)
    for bit in range(6):
        if index >> bit & 1:
            pixels[:, 16 * bit : 16 * (bit + 1)] = 255
    return pixels


def _index_shown(picture: Picture) -> int:
    bands = picture.pixels.mean(dim=(0, 1)).reshape(6, 16)[:, 4:12].mean(dim=1)
    return sum(1 << bit for bit in range(6) if bands[bit] > 0.5)


def _painted_video(path: Path, times: list[int], container_options: dict | None = None, first: int = 0) -> None:
    """libx264 with B-frames (decoded out of order, delayed by the decoder), frame i shown at times[i] ms, painted
    with the index first + i."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "3", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_painted(first + i), format="rgb24")
            frame.pts, frame.time_base = time, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_are_numbered_by_their_time_when_a_cut_or_variable_rate_makes_counting_wrong(tmp_path):
    """Counted in decode order, the frames a B-frame decoder flushed after an undecodable packet (an interrupted
    download) took numbers one too high; a file whose packets all fail was `corrupt_video` "1 undecodable packet"
    (review 45 F1, F2). Each frame shows its index, which its number must match."""
    _painted_video(tmp_path / "whole.mp4", [40 * i for i in range(40)], {"movflags": "faststart"})
    data = (tmp_path / "whole.mp4").read_bytes()
    for fraction in (0.8, 0.9, 0.95):
        (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * fraction)])
        read = list(read_video(str(tmp_path / "cut.mp4"), "cut.mp4", 1, "d"))
        pictures = [p for p in read if isinstance(p, Picture)]
        assert len(pictures) >= 15 and [p.meta["frame"] for p in pictures] == [_index_shown(p) for p in pictures]
        assert [s.reason for s in read if not isinstance(s, Picture)] == ["corrupt_video"]
    (tmp_path / "stub.mp4").write_bytes(data[: len(data) // 2])  # every packet undecodable
    read = list(read_video(str(tmp_path / "stub.mp4"), "stub.mp4", 1, "d"))
    assert [(s.reason, s.detail.split(" (")[0]) for s in read] == [("unreadable_video", "no video frames")]
    # variable rate: bursts at 100 fps, pauses of 0.2 s; every frame kept, in order, one number each
    times = list(itertools.accumulate([0] + [10, 10, 40, 200, 40, 10, 10, 10] * 5))
    _painted_video(tmp_path / "vfr.mkv", times)
    pictures = list(read_video(str(tmp_path / "vfr.mkv"), "vfr.mkv", 1, "d"))
    numbers = [p.meta["frame"] for p in pictures]
    assert [_index_shown(p) for p in pictures] == list(range(len(times))) and numbers == sorted(set(numbers))


def test_video_frames_after_a_timestamp_reset_are_numbered_on_not_dropped(tmp_path):
    """Two MPEG-TS segments joined with `cat`, each timed from 0: numbered by time, the second's frames took the
    first's numbers and were dropped as decoded twice, half the video lost with no skip (review 53 #2)."""
    for part, first in (("a", 0), ("b", 30)):
        _painted_video(tmp_path / f"{part}.ts", [40 * i for i in range(30)], first=first)
    (tmp_path / "joined.ts").write_bytes((tmp_path / "a.ts").read_bytes() + (tmp_path / "b.ts").read_bytes())
    read = list(read_video(str(tmp_path / "joined.ts"), "joined.ts", 1, "d"))
    assert all(isinstance(p, Picture) for p in read)  # nothing lost, no cut reported
    assert [p.meta["frame"] for p in read] == [_index_shown(p) for p in read] == list(range(60))


def test_names_that_are_not_utf8_and_broken_captions_are_tokenized_not_fatal(tmp_path, tiny_tokenizer_dir):
    """A latin-1 file name (on disk or in a tar) or a caption cut inside an emoji stopped the whole job with a
    UnicodeEncodeError, again on every rerun (review 45 #1)."""
    latin = os.fsdecode(b"caf\xe9")  # how Python names the file: a surrogate escape for the byte 0xe9
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / f"{latin}.png").write_bytes(_png(np.full((8, 8, 3), 90, np.uint8)))
    (tmp_path / "photos" / "ok.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "laion").mkdir()
    with tarfile.open(tmp_path / "laion" / "00000.tar", "w") as tar:
        for name, data in ((f"{latin}.png", _png(np.full((8, 8, 3), 90, np.uint8))),
                           ("k1.png", _png(np.zeros((8, 8, 3), np.uint8))),
                           ("k1.json", b'{"caption": "cut \\ud83d"}')):  # a lone surrogate escape, valid JSON
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, tmp_path / "photos", tmp_path / "laion") == 0
    photos, laion = _samples(out / "photos-img-000000.tar"), _samples(out / "00000.tar")
    assert sorted(photos) == sorted([latin, "ok"]) and sorted(laion) == sorted([latin, "k1"])
    assert json.loads(photos[latin]["json"])["source"] == str(tmp_path / "photos" / f"{latin}.png")  # the same name
    assert json.loads(laion["k1"]["json"])["caption"] == "cut \ud83d"
    assert json.loads(photos["ok"]["json"])["source"].endswith("ok.png")
    assert _run(tiny_tokenizer_dir, out, tmp_path / "photos", tmp_path / "laion") == 0  # the rerun finds them complete


def test_options_that_cannot_change_a_shard_leave_its_fingerprint_alone(inputs, tiny_tokenizer_dir, tmp_path, capsys):
    """A new --video-stride or --seed re-tokenized every image and tar shard into the same bytes (review 45 #5)."""
    out = tmp_path / "out"
    assert _run(tiny_tokenizer_dir, out, inputs / "photos", inputs / "laion") == 0
    capsys.readouterr()
    assert _run(tiny_tokenizer_dir, out, inputs / "photos", inputs / "laion", extra=("--video-stride", "2", "--seed", "5")) == 0
    assert "4 shards in all, 4 for this rank, 4 already complete; doing 0 now" in capsys.readouterr().err
    default, other = Options(), Options(video_stride=2, seed=5)
    assert other.fingerprinted(videos=False) == default.fingerprinted(videos=False)
    assert other.fingerprinted(videos=True) != default.fingerprinted(videos=True)  # the stride changes video shards
    masked, masked5 = Options(derive=("masked",)), Options(derive=("masked",), seed=5)
    assert masked.fingerprinted(videos=False) != masked5.fingerprinted(videos=False)  # the seed places the masks


def test_inputs_that_would_be_tokenized_twice_or_merged_are_refused_before_any_work(tmp_path, tiny_tokenizer_dir, capsys):
    """A folder named beside a folder inside it tokenized its images twice; `clip.mp4` and `clip.mkv` became one video
    with every frame number twice (review 45 #11, #4)."""
    (tmp_path / "photos" / "a").mkdir(parents=True)
    for name in ("x.png", "a/y.png"):
        (tmp_path / "photos" / name).write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "photos", tmp_path / "photos" / "a") == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'photos' / 'a' / 'y.png'}: listed twice, under "
                                       f"{tmp_path / 'photos'} and under {tmp_path / 'photos' / 'a'}, which lies inside "
                                       f"it; give only {tmp_path / 'photos'}\n")
    assert find_units([str(tmp_path / "photos" / "a"), str(tmp_path / "photos" / "x.png")])[0]  # no file in common: fine
    (tmp_path / "clips").mkdir()
    _video(tmp_path / "clips" / "clip.mp4", 2)
    _video(tmp_path / "clips" / "clip.mkv", 2, codec="ffv1")
    assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "clips") == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'clips' / 'clip.mp4'}: has the key clip of "
                                       f"{tmp_path / 'clips' / 'clip.mkv'} (keys drop the suffix), so their frames "
                                       "would be one video; rename one\n")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_out_that_cannot_be_made_and_a_file_without_video_are_one_line(tmp_path, tiny_tokenizer_dir, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "file").write_text("")
    assert _run(tiny_tokenizer_dir, tmp_path / "file" / "sub", tmp_path / "in") == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file' / 'sub'}: cannot create --out (Not a directory)\n"
    with av.open(str(tmp_path / "sound.mkv"), "w") as container:  # audio only
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert [(s.reason, s.detail) for s in read_video(str(tmp_path / "sound.mkv"), "sound.mkv", 1, "d")] == [
        ("unreadable_video", "no video stream")]


def test_a_held_last_frame_is_no_loss_and_a_cut_webm_with_sound_is_reported(tmp_path):
    """A complete video whose last picture stays on screen 3 s was `corrupt_video` "ends at 2.0 s of 5.0 s"; a WebM
    with an audio track cut in half lost three quarters of its frames with no skip (review 45 #8, #6)."""
    path = tmp_path / "slides.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        packets = []
        for i, time in enumerate([40 * i for i in range(50)] + [2000]):
            frame = av.VideoFrame.from_ndarray(_painted(i), format="rgb24")
            frame.pts, frame.time_base = time, fractions.Fraction(1, 1000)
            packets += stream.encode(frame)
        for packet in [*packets, *stream.encode()]:
            if packet.pts == 2000:
                packet.duration = 3000  # the last picture stays 3 s
            container.mux(packet)
    read = list(read_video(str(path), "slides.mp4", 1, "d"))
    assert len(read) == 51 and all(isinstance(p, Picture) for p in read)
    path = tmp_path / "talk.webm"
    with av.open(str(path), "w") as container:
        video, audio = container.add_stream("libvpx", rate=25), container.add_stream("libopus", rate=48000)
        video.width, video.height, video.pix_fmt = 96, 48, "yuv420p"
        for i in range(50):
            for packet in video.encode(av.VideoFrame.from_ndarray(_painted(i), format="rgb24")):
                container.mux(packet)
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 48000, i * 960
            for packet in audio.encode(sound):
                container.mux(packet)
        for packet in [*video.encode(), *audio.encode()]:
            container.mux(packet)
    data = path.read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    read = list(read_video(str(tmp_path / "cut.webm"), "cut.webm", 1, "d"))
    pictures, (skip,) = [p for p in read if isinstance(p, Picture)], [s for s in read if not isinstance(s, Picture)]
    assert 5 < len(pictures) < 40 and skip.reason == "corrupt_video"
    assert skip.detail == f"ends at {len(pictures) / 25:.1f} s of 2.0 s"


def test_a_pattern_that_climbs_out_of_its_root_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    """`a/{.,../b}/*.png` gave keys starting with `../`: annotate with --out . replaced the input photo with its own
    edge map (review 52 #3); shards landed outside --out likewise."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{folder}.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    pattern = f"{tmp_path}/a/{{.,../b}}/*.png"
    assert _run(tiny_tokenizer_dir, tmp_path / "out", pattern) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/a/../b/b.png: lies outside {tmp_path}/a, where its "
                                              "pattern starts: its output would be written outside --out")


def test_a_tokenizer_of_more_codes_than_the_lvm_has_ids_is_refused_before_any_work(inputs, tmp_path, capsys):
    """16,384 codes tokenized for hours, and sentences.build then refused ids past 8191 (review 62 #3)."""
    big = tokenizer.VQTokenizer(replace(tiny_vqgan_config(), codebook_size=16384)).save(tmp_path / "vqgan_16k")
    assert _run(big, tmp_path / "out", inputs / "laion") == 2
    assert capsys.readouterr().err == (f"error: {big}: codebook of 16384 codes does not fit the LVM's 8192 code ids "
                                       "(ids from 8192 are BOS, EOS and reserved: common/vocab.py)\n")
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize("names", [("x.jpg", "x.png"), ("x.y.png", "x_y.png")])
def test_two_images_of_one_key_in_two_shards_are_refused_before_any_work(names, tiny_tokenizer_dir, tmp_path, capsys):
    """In one shard the second is a duplicate_key skip; cut into two shards, the key was written twice without a
    word and a pairs build refused the set later (review 62 #5)."""
    (tmp_path / "bad" / "b").mkdir(parents=True)
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / "bad" / "b" / name)
    assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "bad", extra=("--images-per-shard", "1")) == 2
    first, second = (tmp_path / "bad" / "b" / name for name in names)
    assert capsys.readouterr().err == (f"error: {second}: has the key b/{Path(names[1]).stem} of {first}, which another "
                                       "shard holds (keys drop the suffix): the key would be written twice; rename one\n")
    assert _run(tiny_tokenizer_dir, tmp_path / "out", tmp_path / "bad") == 0  # one shard: a skip, as before
    assert "duplicate_key 1" in capsys.readouterr().out
