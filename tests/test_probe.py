"""`lvm.probe`: features equal a manual forward, probes separate synthetic classes, data and error handling."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import lvm.probe.data
import lvm.probe.features
from common.vocab import BOS_ID, CODEBOOK_SIZE
from lvm.model import LVM, LVMConfig
from lvm.probe import ProbeError, heads
from lvm.probe.__main__ import main
from lvm.probe.cache import Cache, module_fingerprint
from lvm.probe.data import read_split
from lvm.probe.features import cached_features, hidden_states, resolve_depths
from lvm.probe.heads import holdout_split, score

TINY = dict(dim=64, mlp_dim=96, n_layers=3, n_heads=4, max_seq_len=64)
CLASSES = ("blue", "green", "red")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LVM(LVMConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def model_ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lvm") / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lvm_config": model.cfg.to_dict()}, path)
    return path


@torch.no_grad()
def manual_states(model: LVM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream after 0..n blocks over [BOS?, tokens], written out by hand; BOS position dropped."""
    bos = model.cfg.bos_id is not None
    if bos:
        tokens = torch.cat([torch.full((len(tokens), 1), BOS_ID), tokens], 1)
    positions = torch.arange(tokens.shape[1])
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    x = model.embed(tokens)
    states = [x]
    for block in model.layers:
        x = block(x, cos, sin, None, None)
        states.append(x)
    return [s[:, int(bos):] for s in states]


@pytest.mark.parametrize("bos_id", [BOS_ID, None])
def test_features_equal_a_manual_forward(bos_id):
    torch.manual_seed(0)
    model = LVM(LVMConfig(**TINY, bos_id=bos_id)).eval()
    tokens = torch.randint(0, CODEBOOK_SIZE, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = manual_states(model, tokens)
    found = hidden_states(model, tokens, [0, 2, 3])
    assert sorted(found) == [0, 2, 3]
    for depth, states in found.items():
        assert states.shape == (3, 16, TINY["dim"])
        torch.testing.assert_close(states, expected[depth], rtol=0, atol=0)
    torch.testing.assert_close(hidden_states(model, tokens, [1])[1], expected[1], rtol=0, atol=0)  # stops early
    assert all(not block._forward_hooks for block in model.layers) and not model.embed._forward_hooks


def test_bfloat16_features_are_cached_as_float32_close_to_the_float32_model(model, tmp_path):
    """What `lvm.probe --dtype bfloat16` (the default on CUDA) runs, on the CPU: numpy has no bfloat16."""
    tokens = np.random.default_rng(0).integers(0, CODEBOOK_SIZE, (5, 16)).astype(np.uint16)
    expected = hidden_states(model, torch.from_numpy(tokens.astype(np.int64)), [1, 3])
    half = LVM(model.cfg).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    found = cached_features(half, module_fingerprint(half, half.cfg.to_dict()), "train", tokens, [1, 3],
                            Cache(tmp_path), batch_size=2)
    for depth in (1, 3):
        np.testing.assert_allclose(found[depth].astype(np.float32), expected[depth].numpy(), rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_features_on_cuda_match_float32_on_cpu(model):
    tokens = torch.randint(0, CODEBOOK_SIZE, (4, 16), generator=torch.Generator().manual_seed(2))
    expected = hidden_states(model, tokens, [1, 3])
    cuda = LVM(model.cfg).to("cuda", torch.bfloat16).eval()
    cuda.load_state_dict(model.state_dict())
    for depth, states in hidden_states(cuda, tokens.cuda(), [1, 3]).items():
        torch.testing.assert_close(states.float().cpu(), expected[depth], rtol=0.05, atol=0.05)


def test_the_fingerprint_sees_weights_moved_within_a_tensor(model):
    """Sums of values and squares alone missed a flipped or permuted matrix, whose features differ (review 37 #10)."""
    changed = LVM(model.cfg)
    changed.load_state_dict(model.state_dict())
    before = module_fingerprint(changed, changed.cfg.to_dict())
    assert module_fingerprint(model, model.cfg.to_dict()) == before
    with torch.no_grad():
        changed.layers[0].attn.q_proj.weight.copy_(changed.layers[0].attn.q_proj.weight.flip(0))
    assert module_fingerprint(changed, changed.cfg.to_dict()) != before


def test_cached_features_are_computed_once(model, tmp_path, monkeypatch):
    tokens = np.random.default_rng(0).integers(0, CODEBOOK_SIZE, (5, 16)).astype(np.uint16)
    cache, fingerprint = Cache(tmp_path), module_fingerprint(model, model.cfg.to_dict())
    features = cached_features(model, fingerprint, "train", tokens, [1, 3], cache, batch_size=2)
    expected = manual_states(model, torch.from_numpy(tokens.astype(np.int64)))
    for depth in (1, 3):
        assert features[depth].dtype == np.float16 and features[depth].shape == (5, 16, TINY["dim"])
        np.testing.assert_allclose(features[depth], expected[depth].numpy(), rtol=2e-3, atol=2e-3)
    monkeypatch.setattr(lvm.probe.features, "hidden_states", lambda *a: pytest.fail("recomputed cached features"))
    again = cached_features(model, fingerprint, "train", tokens, [3, 1], cache)
    np.testing.assert_array_equal(again[3], features[3])
    with pytest.raises(pytest.fail.Exception):  # other tokens: not taken from the cache
        cached_features(model, fingerprint, "train", tokens[::-1].copy(), [1], cache)
    with pytest.raises(pytest.fail.Exception):  # another model (checkpoint): depth 3, still cached, is not taken
        cached_features(model, "another model", "train", tokens, [3], cache)


def test_layers_are_fractions_or_depths():
    assert resolve_depths("0.25,0.5,0.75,1.0", 22) == [6, 11, 17, 22]
    assert resolve_depths("0.25,0.5,0.75,1.0", 4) == [1, 2, 3, 4]
    assert resolve_depths("0,2, 2, 0.01", 4) == [0, 1, 2]  # 0 = embeddings; a fraction above 0 is at least 1
    assert resolve_depths("0.7", 45) == [32] and resolve_depths("0.29", 50) == [15]  # 31.5, 14.5: half up, exactly
    for bad, message in [("1.5", r"outside \[0, 1\]"), ("5", "outside 0..4"), ("x", "neither"), (",", "no layers"),
                         ("1e-1", "neither")]:  # it read as layer 0 (review 52 #11)
        with pytest.raises(ProbeError, match=message):
            resolve_depths(bad, 4)


def test_holdout_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = holdout_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([fit, held])) == list(range(16))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    np.testing.assert_array_equal(held, holdout_split(labels, 0.2, seed=0)[1])


def pattern(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A mostly red, green or blue image: its hue jittered, a gentle gradient in a random direction.

    The random tiny tokenizer maps such images to codes that recur within a class (noisy textures would
    get near-random codes), so the classes are separable from its tokens by construction."""
    base = np.array({"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}[kind]) + rng.integers(-10, 11, 3)
    ramp = np.linspace(-5, 5, size)[:, None] * rng.uniform(-1, 1) + np.linspace(-5, 5, size)[None] * rng.uniform(-1, 1)
    return Image.fromarray(np.clip(base + ramp[..., None], 0, 255).astype(np.uint8))


def image_folder(root, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            pattern(kind, rng).save(root / kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe_data")
    train, val = image_folder(base / "train", 16, seed=0), image_folder(base / "val", 8, seed=1)
    (train / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped and counted
    (train / "green" / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(train / "no_class.png")  # no class folder: no label
    return train, val


def test_probes_separate_synthetic_classes(folders, model_ckpt, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    train, val = folders
    argv = ["--model", str(model_ckpt), "--tokenizer", str(tiny_tokenizer_dir), "--train", str(train), "--val",
            str(val), "--out", str(tmp_path), "--layers", "0,0.5,1.0", "--workers", "0", "--batch-size", "16"]
    main(argv)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes"] == sorted(CLASSES) and report["chance"] == pytest.approx(1 / 3)
    assert report["counts"] == {"train": {c: 16 for c in CLASSES}, "val": {c: 8 for c in CLASSES}}
    assert report["skipped"]["train"] == {"corrupt_image": 1, "empty_file": 1, "no_label": 1}
    assert [row["depth"] for row in report["results"]] == [0, 2, 3]
    for row in report["results"]:
        assert row["attentive"]["top1"] >= 0.9 and row["linear"]["top1"] >= 0.9, row
    assert "| 2 | 0.67 |" in (tmp_path / "report.md").read_text() and "best attentive" in printed
    plot = Image.open(tmp_path / "accuracy_vs_depth.png")
    assert plot.format == "PNG" and plot.size == (720, 480)
    # A rerun takes tokens and features from the cache and gives the same report.
    monkeypatch.setattr(lvm.probe.data, "Encoder", lambda tok: pytest.fail("tokenized again"))
    monkeypatch.setattr(lvm.probe.features, "hidden_states", lambda *a: pytest.fail("features computed again"))
    main(argv)
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_tar_shards_with_a_label_field(tiny_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    images = [pattern(CLASSES[i % 3], rng) for i in range(6)]
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as tar:
        for i, image in enumerate(images):
            png = io.BytesIO()
            image.save(png, format="PNG")
            tar.write({"__key__": f"s{i}", "png": png.getvalue(), "json": {"label": i % 3, "url": "x"}})
        tar.write({"__key__": "nolabel", "png": png.getvalue(), "json": {"url": "x"}})
        tar.write({"__key__": "bad", "png": b"garbage", "json": {"label": 1}})
    split = read_split("train", [str(tmp_path)], tiny_tokenizer, "tok", Cache(tmp_path / "cache"), workers=0)
    assert split.keys == [f"shard-000/s{i}" for i in range(6)] and split.labels == ["0", "1", "2"] * 2
    assert split.skipped == {"no_label": 1, "corrupt_image": 1}
    np.testing.assert_array_equal(split.tokens, tiny_tokenizer.encode(images).numpy())  # the tokenizer's own path
    # b's json after another sample: b is unlabelled, counted once (it was also a split_sample skip: review 52 #6)
    (tmp_path / "late").mkdir()
    with tarfile.open(tmp_path / "late" / "shard-001.tar", "w") as tar:
        for name, data in [("a.png", png.getvalue()), ("a.json", b'{"label": 1}'), ("b.png", png.getvalue()),
                           ("c.png", png.getvalue()), ("c.json", b'{"label": 2}'), ("b.json", b'{"label": 2}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    late = read_split("train", [str(tmp_path / "late")], tiny_tokenizer, "tok", Cache(tmp_path / "cache2"), workers=0)
    assert late.labels == ["1", "2"] and late.skipped == {"no_label": 1}


def test_an_image_replaced_under_its_name_is_tokenized_again(tiny_tokenizer, tmp_path):
    train, cache = image_folder(tmp_path / "train", 2, seed=0), Cache(tmp_path / "cache")
    before = read_split("train", [str(train)], tiny_tokenizer, "tok", cache, workers=0)
    green = pattern("green", np.random.default_rng(5))
    green.save(train / "red" / "00.png")
    after = read_split("train", [str(train)], tiny_tokenizer, "tok", cache, workers=0)
    row = after.keys.index("train-img-000000/red/00")
    np.testing.assert_array_equal(after.tokens[row], tiny_tokenizer.encode([green]).numpy()[0])
    assert not np.array_equal(before.tokens[row], after.tokens[row])


def test_images_in_subfolders_of_a_class_folder_belong_to_that_class(tiny_tokenizer, tmp_path):
    train = image_folder(tmp_path / "train", 2, seed=0)
    (train / "red" / "sub").mkdir()
    (train / "red" / "01.png").rename(train / "red" / "sub" / "01.png")
    split = read_split("train", [str(train)], tiny_tokenizer, "tok", Cache(tmp_path / "cache"), workers=0)
    assert split.labels == ["blue", "blue", "green", "green", "red", "red"]


def test_tars_of_one_name_in_two_folders_are_both_read(tiny_tokenizer, tmp_path):
    """The probe writes no shard per input tar, so two `shard-000.tar` are no clash (as they are for tokenize)."""
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        with wds.TarWriter(str(tmp_path / folder / "shard-000.tar")) as tar:
            for i in range(2):
                png = io.BytesIO()
                pattern(CLASSES[i], rng).save(png, format="PNG")
                tar.write({"__key__": f"s{i}", "png": png.getvalue(), "json": {"label": i}})
    split = read_split("train", [str(tmp_path / "a"), str(tmp_path / "b")], tiny_tokenizer, "tok",
                       Cache(tmp_path / "cache"), workers=0)
    assert split.keys == ["shard-000/s0", "shard-000/s0", "shard-000/s1", "shard-000/s1"] and len(split.tokens) == 4


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # progress lines may come first
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_errors_are_one_line(folders, model_ckpt, tiny_tokenizer_dir, tmp_path, capsys, deny_listing):
    train, val = folders
    base = ["--model", str(model_ckpt), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "o"),
            "--workers", "0"]
    (tmp_path / "t" / "cat").mkdir(parents=True)
    (tmp_path / "t" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "t" / "cat" / "a.png")
    err = _error(base + ["--train", str(tmp_path / "t"), "--val", str(val)], capsys)
    assert err == f"error: {tmp_path / 't' / 'dog'}: empty class folder (no images)"
    deny_listing(tmp_path / "t" / "dog")
    err = _error(base + ["--train", str(tmp_path / "t"), "--val", str(val)], capsys)
    assert err == f"error: {tmp_path / 't' / 'dog'}: cannot list the folder (permission denied)"
    assert _error(base + ["--train", str(tmp_path / "nope"), "--val", str(val)], capsys) == \
        f"error: {tmp_path / 'nope'}: no such file or directory"
    (tmp_path / "taken").write_text("a file")
    assert _error(base + ["--train", str(train), "--val", str(val), "--out", str(tmp_path / "taken")], capsys) == \
        f"error: {tmp_path / 'taken'}: --out exists and is not a folder"
    (tmp_path / "v" / "cow").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "v" / "cow" / "a.png")
    assert "'cow' is not among the 3 train classes" in _error(base + ["--train", str(train), "--val", str(tmp_path / "v")], capsys)
    assert "--layers: layer 9 is outside 0..3" in _error(base + ["--train", str(train), "--val", str(val), "--layers", "9"], capsys)
    assert _error(base + ["--train", str(train), "--val", str(val), "--lr", "nan"], capsys) == "error: --lr: must be positive, got nan"
    # review 52: --out inside --train (a rerun read its plot as a new class); a pattern matching folders (its classes
    # were the folders under where the pattern starts)
    assert _error(base[:4] + ["--out", str(train / "probe"), "--train", str(train), "--val", str(val)], capsys) == (
        f"error: {train / 'probe'}: --out is inside the input folder {train}; a rerun would read its plot as an image "
        "of a new class: choose an --out outside the inputs")
    pattern = f"{train.parent}/{{train,val}}"
    assert _error(base + ["--train", pattern, "--val", str(val)], capsys).startswith(
        f"error: {pattern}: a pattern that matches folders: give each ImageFolder as a path")
    torch.manual_seed(0)
    other = LVM(LVMConfig(**{**TINY, "vocab_size": 1024 + 100, "bos_id": None}))  # no BOS: 8192 is past its vocabulary
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()},
                "lvm_config": other.cfg.to_dict()}, tmp_path / "other.ckpt")
    err = _error(base[2:] + ["--model", str(tmp_path / "other.ckpt"), "--train", str(train), "--val", str(val)], capsys)
    assert err.startswith(f"error: {tiny_tokenizer_dir}: codebook of 8192 codes does not fit the model's 1024 code ids")


def test_val_images_that_are_train_images_are_warned_about(folders, model_ckpt, tiny_tokenizer_dir, tmp_path, capsys):
    train, _ = folders
    main(["--model", str(model_ckpt), "--tokenizer", str(tiny_tokenizer_dir), "--train", str(train), "--val", str(train),
          "--out", str(tmp_path), "--layers", "0", "--epochs", "1", "--workers", "0", "--batch-size", "16"])
    assert ("warning: 48 of the 48 --val images have the tokens of a --train image (the same images in both splits?): "
            "their scores measure memory, not features") in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())  # what gets shared says so too
    assert (report["val_shared_with_train"], report["dtype"], report["device"]) == (48, "float32", "cpu")
    assert "Warning: 48 val images have the tokens of a train image" in (tmp_path / "report.md").read_text()


def test_a_probe_comes_back_with_the_weights_of_its_best_holdout_epoch(monkeypatch):
    """Holdout labels contradict the training labels, so training makes the holdout worse after the first epoch:
    the probe returned must be its best epoch's, not the last one's."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(80, 4)).astype(np.float32)
    labels = (inputs[:, 0] > 0).astype(np.int64)
    labels[60:] = 1 - labels[60:]  # the holdout rows
    fit, holdout = np.arange(60), np.arange(60, 80)
    torch.manual_seed(0)
    losses = []  # the holdout loss after each epoch

    def recording(*args):
        result = score(*args)
        losses.append(result[1])
        return result

    monkeypatch.setattr(heads, "score", recording)
    probe, accuracy, best_epoch, ran = heads.train(
        torch.nn.Linear(4, 2), inputs, labels, fit, holdout, heads.Training(epochs=12, patience=12, lr=0.05, batch_size=16))
    assert ran == 12 and best_epoch < ran and losses[-1] > min(losses)
    assert score(probe, inputs, labels, holdout, 16) == pytest.approx((accuracy, min(losses)))


def test_the_linear_probe_is_standardised_with_the_statistics_of_the_fit_rows(monkeypatch):
    """The holdout rows choose the epoch: their features must not enter the standardisation either."""
    features = np.random.default_rng(0).normal(size=(40, 4, 8)).astype(np.float32)
    labels = np.arange(40) % 2
    trained = []

    def keeping(probe, *args):
        trained.append(probe)
        return train(probe, *args)

    train = heads.train
    monkeypatch.setattr(heads, "train", keeping)
    settings = heads.Training(epochs=1)
    heads.run_probe("linear", features, labels, features, labels, 2, 2, settings, torch.device("cpu"))
    fit, _ = holdout_split(labels, settings.holdout, settings.seed)
    pooled = torch.from_numpy(heads.mean_pool(features))
    torch.testing.assert_close(trained[0].mean, pooled[fit].mean(0))
    torch.testing.assert_close(trained[0].std, pooled[fit].std(0))
