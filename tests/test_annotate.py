"""`python -m lvm.annotate`: edges, depth, normals and segmentation maps keyed like their images.

Real photos come from scikit-image's data module; the depth and segmentation models are tiny randomly
initialised transformers models (Depth Anything, SegFormer) saved to a temporary folder and loaded by path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from PIL import Image

from lvm.annotate import AnnotateError
from lvm.annotate.__main__ import main
from lvm.annotate.pipeline import Batch, Job, model_roles, source
from lvm.annotate.render import (
    RELIEF,
    encode_normals,
    fill_depth_holes,
    nearness,
    normals_from_depth,
    normals_from_nearness,
)
from lvm.annotate.writer import UnitOutput, is_done
from lvm.palette import label_palette
from lvm.tokenize.__main__ import main as tokenize
from lvm.tokenize.sources import find_units
from sentences.build import build
from sentences.spec import load_spec
from weights import module_digest

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = {"astronaut": (512, 512), "chelsea": (300, 451), "cat/coffee": (400, 600), "rocket": (427, 640)}


def _run(*args: str | Path) -> int:
    try:
        return main([*map(str, args), "--workers", "0"])
    except SystemExit as exit_:
        return int(exit_.code)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real photos (PNG, two larger than the 512 px working size, one in a subfolder) and a corrupt JPEG."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    for name in PHOTOS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage_data, name.split("/")[-1])()).convert("RGB").save(root / f"{name}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Depth Anything (aspect-keeping processor) and a tiny SegFormer (5 labels), random weights, on disk."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8,
        reassemble_hidden_size=16))
    depth.save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(root / "depth")
    seg = SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=5, patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]))
    with torch.no_grad():  # logits of unit scale, not transformers' 0.02-std init: classes ~1e-7 apart would flip
        for layer in seg.modules():  # with the last bits of another CPU's kernels
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
    seg.save_pretrained(root / "seg")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "seg")
    return {"depth": root / "depth", "seg": root / "seg"}


@pytest.fixture(scope="module")
def annotated(photos: Path, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("annot") / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges,depth,normals,segmentation", "--batch-size", "3",
                "--depth-model", models["depth"], "--seg-model", models["seg"]) == 0
    return out


def _working(name: str) -> np.ndarray:
    """The photo as the annotations see it: RGB uint8, longer side at most 512 (antialiased bilinear)."""
    rgb = np.array(Image.open(io.BytesIO(_png_of(name))).convert("RGB"))
    height, width = rgb.shape[:2]
    scale = min(1.0, 512 / max(height, width))
    if scale == 1.0:
        return rgb
    size = (round(height * scale), round(width * scale))
    x = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=size, mode="bilinear",
                      antialias=True, align_corners=False)[0].clamp(0, 1)
    return (x * 255).round().byte().permute(1, 2, 0).numpy()


def _png_of(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage_data, name.split("/")[-1])()).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _square(rgb: np.ndarray) -> np.ndarray:
    side = max(rgb.shape[:2])
    x = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=(side, side), mode="bilinear",
                      align_corners=False)
    return x[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_one_edge_map_per_good_photo_and_the_corrupt_one_reported(photos, tmp_path, capsys):
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    captured = capsys.readouterr()
    assert "annotate: 4 images annotated (edges 4)" in captured.out and "skipped 1: corrupt_image 1" in captured.out
    assert f"skipped {photos / 'broken.jpg'}: corrupt_image" in captured.err
    written = sorted(str(p.relative_to(out / "edges")) for p in (out / "edges").rglob("*.png"))
    assert written == sorted(f"{name}.png" for name in PHOTOS)
    report = json.loads((out / "edges" / "photos-img-000000.report.json").read_text())
    assert report["skipped_items"][0]["item"] == str(photos / "broken.jpg") and report["images"] == 4
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0  # a rerun: all done, skips remembered
    assert "(1 already complete, 4 images); skipped 1: corrupt_image 1 (1 of them in units completed by earlier runs)" in \
        capsys.readouterr().out
    for name, (height, width) in PHOTOS.items():
        edges = np.asarray(Image.open(out / "edges" / f"{name}.png"))
        scale = min(1.0, 512 / max(height, width))
        assert edges.shape == (round(height * scale), round(width * scale)) and set(np.unique(edges)) <= {0, 255}
        assert np.array_equal(edges, cv2.Canny(_working(name), 100, 200))  # OpenCV's Canny, thresholds 100/200
        assert 0.01 < (edges > 0).mean() < 0.3  # a real photo has edges, not noise everywhere


def test_a_rerun_counts_the_skips_of_every_unit_already_complete(tmp_path, capsys):
    """Its last line adds the skips each complete unit's report recorded, not only those of the last one read."""
    folders = [tmp_path / "images" / name for name in ("a", "b")]
    for seed, folder in enumerate(folders):
        folder.mkdir(parents=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"ok{seed}.png")  # maps are keyed by file name: no two alike
        (folder / f"broken{seed}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for _ in range(2):
        assert _run("--images", *folders, "--out", tmp_path / "out", "--tasks", "edges") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(2 already complete, 2 images); skipped 2: corrupt_image 2 (2 of them in units completed by earlier runs);" in last


def test_normals_of_a_tilted_plane_are_constant_and_of_a_sphere_point_outward():
    v, u = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    plane = normals_from_depth(100 + 0.5 * u - 0.25 * v)  # farther to the right and to the top
    expected = torch.tensor([0.5, 0.25, 1.0]) / torch.tensor([0.5, 0.25, 1.0]).norm()
    assert torch.allclose(plane, expected[:, None, None].expand_as(plane), atol=1e-6)
    radius, cu, cv = 30.0, 50.0, 40.0
    v, u = torch.meshgrid(torch.arange(80.0), torch.arange(100.0), indexing="ij")
    rho2 = (u - cu) ** 2 + (v - cv) ** 2
    inside = rho2 < (0.8 * radius) ** 2
    height = torch.sqrt((radius**2 - rho2).clamp_min(0))
    normals = normals_from_depth(200 - height)  # the front of a ball: nearest at its centre
    outward = torch.stack([u - cu, -(v - cv), height]) / radius  # x right, y up, z towards the camera
    cosine = (normals * outward).sum(0)[inside]
    assert cosine.min() > 0.995
    rgb = encode_normals(normals)
    assert tuple(rgb[40, 50]) == (128, 128, 255)  # facing the camera: the usual light blue
    assert rgb[40, 75, 0] > 200 and rgb[15, 50, 1] > 200  # right side points right (R), top points up (G)
    flat = normals_from_nearness(torch.full((8, 8), 0.3))
    assert torch.equal(flat, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 8, 8)) and RELIEF == 0.5


def test_depth_and_segmentation_come_from_the_local_models(annotated, models):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

    depth_model = AutoModelForDepthEstimation.from_pretrained(models["depth"]).eval()
    depth_proc = AutoImageProcessor.from_pretrained(models["depth"])
    seg_model = AutoModelForSemanticSegmentation.from_pretrained(models["seg"]).eval()
    seg_proc = AutoImageProcessor.from_pretrained(models["seg"])
    palette = label_palette()
    for name in PHOTOS:
        rgb = _working(name)
        size = rgb.shape[:2]
        with torch.no_grad():
            predicted = depth_model(**depth_proc(images=[_square(rgb)], return_tensors="pt")).predicted_depth
            seg_out = seg_model(**seg_proc(images=[_square(rgb)], return_tensors="pt"))
        d = F.interpolate(predicted[None], size=size, mode="bilinear", align_corners=False)[0, 0]
        d = (d - d.min()) / (d.max() - d.min())  # relative model: inverse depth, normalised per image
        written = Image.open(annotated / "depth" / f"{name}.png")
        assert written.mode == "I;16" and written.size == size[::-1]
        assert np.abs(np.asarray(written).astype(np.int64) - (d * 65535).round().numpy()).max() <= 2
        normals = np.asarray(Image.open(annotated / "normals" / f"{name}.png"))
        assert np.abs(normals.astype(int) - encode_normals(normals_from_nearness(d)).astype(int)).max() <= 1
        labels = seg_proc.post_process_semantic_segmentation(seg_out, target_sizes=[size])[0].numpy()
        seg = Image.open(annotated / "segmentation" / f"{name}.png")
        assert seg.mode == "P" and len(np.unique(labels)) > 1
        # the same labels but where upsampling puts two classes within float error of each other (class borders)
        assert (np.asarray(seg) == labels).mean() > 0.999
        assert np.array_equal(np.asarray(seg.convert("RGB")), palette[np.asarray(seg)])  # the shared palette
    for task in ("depth", "normals", "segmentation"):  # every task's report records the corrupt photo
        assert json.loads((annotated / task / "photos-img-000000.report.json").read_text())["skipped"] == {"corrupt_image": 1}


def test_a_normals_model_replaces_normals_from_depth(photos, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Tipsv2DptForNormalEstimation"):
        pytest.skip(f"transformers {transformers.__version__} has no normal-estimation models")
    from transformers import (
        AutoImageProcessor,
        AutoModelForNormalEstimation,
        Tipsv2DptConfig,
        Tipsv2DptForNormalEstimation,
        Tipsv2DptImageProcessor,
    )

    torch.manual_seed(0)
    backbone = {"model_type": "tipsv2_vision_model", "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                "image_size": 28, "patch_size": 14, "out_indices": [1, 2, 3, 4], "reshape_hidden_states": False}
    Tipsv2DptForNormalEstimation(Tipsv2DptConfig(backbone_config=backbone, neck_hidden_sizes=[8, 8, 8, 8],
                                                 fusion_hidden_size=8)).save_pretrained(tmp_path / "normals")
    Tipsv2DptImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path / "normals")
    assert _run("--images", photos, "--out", tmp_path / "annot", "--tasks", "normals", "--normals-model", tmp_path / "normals") == 0
    model = AutoModelForNormalEstimation.from_pretrained(tmp_path / "normals").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "normals")
    for name in ["astronaut", "cat/coffee"]:
        rgb = _working(name)
        with torch.no_grad():
            outputs = model(**processor(images=[_square(rgb)], return_tensors="pt"))
        normals = F.normalize(processor.post_process_normal_estimation(outputs, target_sizes=[rgb.shape[:2]])[0]["normals"], dim=0)
        written = np.asarray(Image.open(tmp_path / "annot" / "normals" / f"{name}.png")).astype(int)
        assert np.abs(written - encode_normals(normals).astype(int)).max() <= 1


def test_a_batch_gives_what_single_images_give(photos, models, annotated, tmp_path):
    out = tmp_path / "one"
    assert _run("--images", photos, "--out", out, "--tasks", "depth,segmentation", "--batch-size", "1",
                "--depth-model", models["depth"], "--seg-model", models["seg"]) == 0
    for name in PHOTOS:
        one = np.asarray(Image.open(out / "depth" / f"{name}.png")).astype(int)
        assert np.abs(one - np.asarray(Image.open(annotated / "depth" / f"{name}.png"))).max() <= 2
        one, three = (np.asarray(Image.open(root / "segmentation" / f"{name}.png")) for root in (out, annotated))
        assert (one == three).mean() > 0.999  # class borders may flip with the batch's float order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_maps(photos, models, annotated, tmp_path):
    """GPU counterpart of the tests above (float32 with TF32 matmuls on CUDA): the same maps up to rounding."""
    out = tmp_path / "cuda"
    assert main(["--images", str(photos), "--out", str(out), "--tasks", "edges,depth,normals,segmentation",
                 "--depth-model", str(models["depth"]), "--seg-model", str(models["seg"]), "--device", "cuda",
                 "--batch-size", "3", "--workers", "1"]) == 0
    for name in PHOTOS:
        assert (out / "edges" / f"{name}.png").read_bytes() == (annotated / "edges" / f"{name}.png").read_bytes()
        for task, tolerance in [("depth", 700), ("normals", 8)]:
            cuda, cpu = (np.asarray(Image.open(root / task / f"{name}.png")).astype(int) for root in (out, annotated))
            assert np.percentile(np.abs(cuda - cpu), 99) <= tolerance
        cuda, cpu = (np.asarray(Image.open(root / "segmentation" / f"{name}.png")) for root in (out, annotated))
        assert (cuda == cpu).mean() > 0.99


def test_normals_from_another_depth_model_are_redone(photos, models, tmp_path, capsys):
    """Normals made from depth depend on the depth model: its identity is in their fingerprint."""
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    other = DepthAnythingForDepthEstimation.from_pretrained(models["depth"])
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(tmp_path / "depth2")
    AutoImageProcessor.from_pretrained(models["depth"]).save_pretrained(tmp_path / "depth2")
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "normals", "--depth-model", models["depth"]) == 0
    assert _run("--images", photos, "--out", out, "--tasks", "normals", "--depth-model", models["depth"]) == 0
    assert "(1 already complete, " in capsys.readouterr().out.splitlines()[-1]
    copy = shutil.copytree(models["depth"], tmp_path / "moved" / "depth")  # the same model found elsewhere
    assert _run("--images", photos, "--out", out, "--tasks", "normals", "--depth-model", copy) == 0
    assert "(1 already complete, " in capsys.readouterr().out.splitlines()[-1]
    # A report of a version before 2026-12-07, whose fingerprint held the model's path as given: still complete
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(copy)
    legacy_model = {"name": str(copy), "config": json.loads(model.config.to_json_string(use_diff=False)),
                    "processor": json.loads(AutoImageProcessor.from_pretrained(copy).to_json_string()),
                    "weights": module_digest(model)}
    settings = {"task": "normals", "max_size": 512, "format": 1, "relief": RELIEF, "depth": legacy_model}
    (unit,), _ = find_units([str(photos)])
    report_path = out / "normals" / f"{unit.name}.report.json"
    report = json.loads(report_path.read_text())
    text = json.dumps(settings, sort_keys=True, default=str)
    report["fingerprint"] = hashlib.sha1(f"{text}\n{unit.inputs_digest()}".encode()).hexdigest()
    report_path.write_text(json.dumps(report))
    assert _run("--images", photos, "--out", out, "--tasks", "normals", "--depth-model", copy) == 0
    assert "(1 already complete, " in capsys.readouterr().out.splitlines()[-1]
    assert _run("--images", photos, "--out", out, "--tasks", "normals", "--depth-model", tmp_path / "depth2") == 0
    assert "(0 already complete)" in capsys.readouterr().out.splitlines()[-1]


def test_rerun_keeps_complete_outputs_and_redoes_partial_ones(photos, tmp_path, capsys):
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges", "--images-per-shard", "2") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "edges" / "photos-img-000001.report.json").unlink()  # as if killed while writing that unit
    (out / "edges" / "chelsea.png").unlink()
    capsys.readouterr()
    assert _run("--images", photos, "--out", out, "--tasks", "edges", "--images-per-shard", "2") == 0
    assert "in 1 units (2 already complete, " in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert set(after) == set(before)
    redone = {p.name for p in after if after[p] != before.get(p)}
    assert redone == {"coffee.png", "chelsea.png"}  # the whole unit [cat/coffee, chelsea]; [astronaut, broken], [rocket] kept


def test_a_unit_being_redone_is_complete_under_no_settings_until_its_report(photos, tmp_path, capsys):
    """A redo with other settings killed part-way left maps of both settings, which the old report called complete
    when the old settings came back (review 37 #2): the old report goes before the first new map."""
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    (unit,), _ = find_units([str(photos)])
    report = json.loads((out / "edges" / f"{unit.name}.report.json").read_text())
    assert is_done(out / "edges", unit, report["fingerprint"])
    with ThreadPoolExecutor(1) as pool:
        UnitOutput(out / "edges", "edges", unit, "other settings", pool).add("astronaut", lambda: b"a new map")
    assert not is_done(out / "edges", unit, report["fingerprint"])
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    assert "in 1 units (0 already complete)" in capsys.readouterr().out
    assert is_done(out / "edges", unit, report["fingerprint"])


def test_the_summary_counts_units_complete_in_every_task(photos, models, tmp_path, capsys):
    """It counted (unit, task) outputs as units: "in 12 units (35 already complete)" of a 20-unit job."""
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges", "--images-per-shard", "2") == 0
    capsys.readouterr()
    assert _run("--images", photos, "--out", out, "--tasks", "edges,depth", "--images-per-shard", "2",
                "--depth-model", models["depth"]) == 0
    captured = capsys.readouterr()
    assert "3 task outputs already complete; doing 3 units now (depth)" in captured.err
    assert "in 3 units (0 already complete)" in captured.out.splitlines()[-1]


def _tar(shard: Path) -> Path:
    """An img2dataset-like tar of two photos, keys 000000001 and 000000002."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for key, name in [("000000001", "astronaut"), ("000000002", "chelsea")]:
            for member, data in [(f"{key}.png", _png_of(name)), (f"{key}.json", b'{"caption": "x"}')]:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return shard


def test_tar_shards_give_tars_with_the_same_keys(tmp_path, capsys):
    shard = _tar(tmp_path / "laion" / "00000.tar")
    assert _run("--images", shard.parent, "--out", tmp_path / "annot", "--tasks", "edges") == 0
    samples = list(wds.tarfile_samples([{"url": str(tmp_path / "annot" / "edges" / "00000.tar")}]))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("000000001", ["png"]), ("000000002", ["png"])]
    edges = np.asarray(Image.open(io.BytesIO(samples[1]["png"])))
    assert np.array_equal(edges, cv2.Canny(_working("chelsea"), 100, 200))
    written = (tmp_path / "annot" / "edges" / "00000.tar").read_bytes()
    (tmp_path / "annot" / "edges" / "00000.tar").unlink()  # lost: the report alone does not make the unit complete
    capsys.readouterr()
    assert _run("--images", shard.parent, "--out", tmp_path / "annot", "--tasks", "edges") == 0
    assert "in 1 units (0 already complete)" in capsys.readouterr().out
    assert (tmp_path / "annot" / "edges" / "00000.tar").read_bytes() == written


def test_annotations_tokenize_and_build_pairs_and_multitask_sentences(photos, annotated, tiny_tokenizer_dir, tmp_path):
    tokens = tmp_path / "tokens"
    for name, src in [("images", photos), ("edges", annotated / "edges"), ("depth", annotated / "depth")]:
        assert tokenize(["--shards", str(src), "--out", str(tokens / name), "--tokenizer", str(tiny_tokenizer_dir),
                         "--workers", "0"]) == 0
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"window": 16 * 16, "sources": [
        {"name": "edges", "kind": "pairs", "shards": str(tokens / "images"), "annotations": {"edges": str(tokens / "edges")}, "pairs": 2},
        {"name": "multi", "kind": "multitask", "shards": str(tokens / "images"),
         "annotations": {"edges": str(tokens / "edges"), "depth": str(tokens / "depth")}, "shots": 2},
    ]}))
    summary, _ = build(load_spec(spec), tmp_path / "sentences")
    assert summary.sources["edges"]["sentences"] == 2 and summary.sources["multi"]["sentences"] == 2
    assert not summary.sources["edges"]["unused"]  # every photo found its edge map by key
    keys = set()
    for sample in wds.tarfile_samples([{"url": str(p)} for p in sorted((tmp_path / "sentences").glob("*.tar"))]):
        info = json.loads(sample["json"])
        sets = [image["set"] for image in info["images"]]
        if info["kind"] == "pairs":
            assert sets == ["image", "edges"] * (len(sets) // 2)
            pairs = list(zip(info["images"][::2], info["images"][1::2]))
            assert all(a["key"] == b["key"] for a, b in pairs)
            keys |= {a["key"] for a, _ in pairs}
        else:
            assert len({image["key"] for image in info["images"][:3]}) == 1 and sorted(sets[:3]) == ["depth", "edges", "image"]
    assert keys == set(PHOTOS)


def test_a_loader_pinning_memory_pins_the_processors_batches(monkeypatch):
    """DataLoader(pin_memory=True) pins tensors, mappings, sequences and objects with a `pin_memory` method; a Batch
    without one kept its pixels pageable (review 37 #8). Pinning needs a GPU: here Tensor.pin_memory records."""
    from torch.utils.data._utils.pin_memory import pin_memory as pin_as_the_loader_does

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned.append(self) or self.clone())
    batch = Batch(0, ["k"], [(4, 4)], [], {"depth": torch.zeros(1, 3, 4, 4), "segmentation": torch.ones(1, 3, 4, 4)},
                  [], True)
    out = pin_as_the_loader_does(batch)
    assert isinstance(out, Batch) and len(pinned) == 2
    assert all(out.pixel_values[role] is not batch_pixels for role, batch_pixels in zip(out.pixel_values, pinned))


def test_models_that_cannot_run_are_refused_before_any_work(photos, models, tmp_path, capsys, monkeypatch):
    """A truncated weights file was a traceback; a model wanting more than images (OneFormer's task_inputs) loaded,
    then failed on its first batch (review 37 #5, #6)."""
    cut = shutil.copytree(models["depth"], tmp_path / "cut")
    weights_file = cut / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    assert _run("--images", photos, "--out", tmp_path / "a", "--tasks", "depth", "--depth-model", cut) == 2
    assert capsys.readouterr().err.startswith(f"error: {cut}: cannot load a depth model (")
    from transformers import SegformerForSemanticSegmentation

    def forward(self, pixel_values, task_inputs, labels=None):
        raise AssertionError("never run")

    monkeypatch.setattr(SegformerForSemanticSegmentation, "forward", forward)
    assert _run("--images", photos, "--out", tmp_path / "a", "--tasks", "segmentation", "--seg-model", models["seg"]) == 2
    assert capsys.readouterr().err == (f"error: {models['seg']}: SegformerForSemanticSegmentation needs task_inputs "
                                       "besides pixel_values, which annotate does not give; use a model that takes "
                                       "images alone\n")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "depth"], "error: --depth-model is needed (depth)"),
    (["--tasks", "normals"], "error: --depth-model is needed (normals without --normals-model come from depth)"),
    (["--tasks", "segmentation", "--seg-model", "{missing}"], "error: {missing}: no such file or directory"),
    (["--tasks", "depth", "--depth-model", "nope/"], "error: nope/: no such file or directory"),  # at once, no hub retries
    (["--tasks", "depth", "--depth-model", "{seg}"], "error: {seg}: cannot load a depth model"),
    # a hub id not cached: the error names the flag the user has, --seg-model (it said --segmentation-model)
    (["--tasks", "segmentation", "--seg-model", "nope/missing"], "error: nope/missing: no such local path, and as a hub id"),
])
def test_bad_options_and_models_are_one_line_errors(photos, models, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is looked up in the cache only
    fill = {"missing": str(tmp_path / "nope"), "seg": str(models["seg"])}
    assert _run("--images", photos, "--out", tmp_path / "annot", *[a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(**fill)) and "--segmentation-model" not in err[0]


def test_out_inside_the_inputs_is_refused(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "coffee.png").write_bytes(_png_of("coffee"))
    assert _run("--images", tmp_path / "p", "--out", tmp_path / "p" / "annot", "--tasks", "edges") == 2
    assert "--out is inside the input folder" in capsys.readouterr().err and not (tmp_path / "p" / "annot").exists()


def test_out_inside_the_inputs_of_a_glob_is_refused_on_the_rerun(tmp_path, capsys):
    """`p/*` matches --out p/annot once it exists: the rerun must not annotate the maps of the first run."""
    (tmp_path / "p" / "cats").mkdir(parents=True)
    (tmp_path / "p" / "cats" / "coffee.png").write_bytes(_png_of("coffee"))
    args = ("--images", f"{tmp_path}/p/*", "--out", tmp_path / "p" / "annot", "--tasks", "edges")
    assert _run(*args) == 0
    capsys.readouterr()
    assert _run(*args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'p' / 'annot'}: --images found inputs among the maps of --out "
        f"({tmp_path / 'p' / 'annot' / 'edges' / 'cats'}): they would be annotated as images; choose an --out outside "
        "the inputs")
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "p").rglob("*.png")) == [
        "p/annot/edges/cats/coffee.png", "p/cats/coffee.png"]


def test_inputs_under_out_but_outside_its_map_folders_are_fine(tmp_path, capsys):
    """docs/scaling.md's layout: `--images annot/images --out annot` writes annot/edges/..., which no rerun reads."""
    (tmp_path / "annot" / "images").mkdir(parents=True)
    (tmp_path / "annot" / "images" / "coffee.png").write_bytes(_png_of("coffee"))
    args = ("--images", tmp_path / "annot" / "images", "--out", tmp_path / "annot", "--tasks", "edges")
    assert _run(*args) == 0 and (tmp_path / "annot" / "edges" / "coffee.png").is_file()
    capsys.readouterr()
    assert _run(*args) == 0
    assert "(1 already complete, " in capsys.readouterr().out


def test_frame_folders_tokenize_into_sequence_sentences(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    """seq/<name>/*.png -> frames numbered in natural name order -> [BOS, consecutive frames at one stride, EOS]."""
    rng = np.random.default_rng(0)
    frames, counts = {}, {"walk": 13, "pan": 9}  # 4 frames fit at strides 1..4 in 13, at 1..2 in 9
    for name, count in counts.items():
        (tmp_path / "seq" / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "seq" / name / f"f{i}.png")  # f10 after f9: natural order
            frames[(name, i)] = tiny_tokenizer.encode([pixels]).numpy()[0]
    assert tokenize(["--shards", str(tmp_path / "seq"), "--out", str(tmp_path / "tokens"), "--frame-folders",
                     "--tokenizer", str(tiny_tokenizer_dir), "--workers", "0", "--images-per-shard", "7"]) == 0
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"window": 16 * 16, "sources": [
        {"name": "seq", "kind": "sequence", "shards": str(tmp_path / "tokens"), "frames": 4, "epochs": 20}]}))
    summary, _ = build(load_spec(spec), tmp_path / "sentences")
    assert summary.sources["seq"]["sentences"] == 20 * 2  # one clip per sequence and pass
    strides = set()
    for sample in wds.tarfile_samples([{"url": str(p)} for p in sorted((tmp_path / "sentences").glob("*.tar"))]):
        tokens, info = np.load(io.BytesIO(sample["tokens.npy"])), json.loads(sample["json"])
        metas = [image["meta"] for image in info["images"]]
        assert info["kind"] == "sequence" and tokens[0] == 8192 and tokens[-1] == 8193 and len(tokens) == 2 + 16 * len(metas)
        assert len({m["video"] for m in metas}) == 1
        indices = [m["frame"] for m in metas]
        assert all(f"seq/{m['path']}" == f"{m['video']}/f{m['frame']}.png" for m in metas)
        (step,) = {b - a for a, b in zip(indices, indices[1:])}
        assert len(metas) == 4 and step <= (counts[metas[0]["folder"]] - 1) // 3  # all frames, a stride that fits
        strides.add((metas[0]["folder"], step))
        expected = np.concatenate([frames[(m["folder"], m["frame"])] for m in metas])
        assert np.array_equal(tokens[1:-1], expected)
    # one random stride per clip from the release's range [1, 4], cut to the strides at which 4 frames fit
    assert strides == {("walk", 1), ("walk", 2), ("walk", 3), ("walk", 4), ("pan", 1), ("pan", 2)}


def test_the_depth_model_runs_for_normals_only_without_a_normals_model():
    """A unit that lacks only normals, with a normals model loaded, must not pay for a depth pass."""
    assert source("normals", ["depth", "normals"]) == "normals"
    assert source("normals", ["depth"]) == "depth"  # normals from depth
    assert source("depth", ["depth", "normals"]) == "depth" and source("edges", ["depth"]) is None
    job = Job(images=[], out=Path("o"), tasks=("normals", "depth"), depth_model="d", normals_model="n")
    assert model_roles(("normals",), job) == {"normals": "n"} and model_roles(("depth", "normals"), job) == {
        "depth": "d", "normals": "n"}
    job = Job(images=[], out=Path("o"), tasks=("normals",), normals_model=None)
    with pytest.raises(AnnotateError, match=r"--depth-model is needed \(normals without --normals-model come from depth\)"):
        model_roles(("normals",), job)


def test_padding_of_a_normals_processor_is_cropped_before_resizing():
    """Sapiens2 pads the square it is given to 1024 x 768: the normals of those pad rows must not reach the map."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Sapiens2ImageProcessor"):
        pytest.skip(f"transformers {transformers.__version__} has no Sapiens2")
    from types import SimpleNamespace

    from lvm.annotate.models import Model, predict

    processor = transformers.Sapiens2ImageProcessor(do_pad=True)
    square = np.full((64, 64, 3), 128, np.uint8)
    pixel_values = processor(images=[square], return_tensors="pt")["pixel_values"]  # [1, 3, 1024, 768]

    class PaddedNormals(torch.nn.Module):  # (0, 0, 1) on the image, (1, 0, 0) on the 128 pad rows above and below
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values):
            normals = torch.zeros(1, 3, 1024, 768)
            normals[:, 2] = 1
            normals[:, :, :128] = normals[:, :, -128:] = torch.tensor([1.0, 0, 0])[:, None, None]
            return SimpleNamespace(normals=normals)

    model = Model("normals", "fake", PaddedNormals(), processor, {}, {})
    (normals,) = predict(model, pixel_values, [(48, 64)])
    assert normals.shape == (3, 48, 64) and (normals[2] > 0.99).all()


def test_nearness_inverts_metric_depth_and_keeps_disparity():
    """Metric models give distance (far = large), relative ones disparity (near = large); nearness: 1 = closest."""
    values = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    torch.testing.assert_close(nearness(values, metric=True), torch.tensor([[1.0, 3 / 7], [1 / 7, 0.0]]))
    torch.testing.assert_close(nearness(values, metric=False), torch.tensor([[0.0, 1 / 7], [3 / 7, 1.0]]))



def test_places_without_a_depth_estimate_are_farthest_also_after_a_resize():
    """Planes at 2 m and 4 m with a 2x2 hole of zeros (no estimate), upsampled as `predict` does: the hole smeared into
    small distances at its edge made them the nearest things, and the near plane came out at 0.07, not 1."""
    depth = torch.full((1, 8, 8), 4.0)
    depth[:, :, :4] = 2.0
    depth[:, 3:5, 6:8] = 0.0
    for raw, want_near in ((depth, False), (fill_depth_holes(depth), True)):
        big = nearness(torch.nn.functional.interpolate(raw[None], size=(32, 32), mode="bilinear")[0, 0], metric=True)
        assert (big[:, :8].mean().item() == pytest.approx(1.0)) == want_near
    filled = fill_depth_holes(depth)
    assert filled[0, 3, 6] == 4.0 and torch.equal(filled[depth > 0], depth[depth > 0])



def test_metric_depth_of_glpn_is_inverted_into_nearness(tmp_path):
    """GLPN predicts metres (sigmoid * max_depth): the pixel it puts farthest must be written darkest."""
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessor

    torch.manual_seed(0)
    config = GLPNConfig(num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 8, 16, 16],
                        num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=8, head_in_index=-1, max_depth=10)
    model = GLPNForDepthEstimation(config).eval()
    model.save_pretrained(tmp_path / "glpn")
    processor = GLPNImageProcessor()
    processor.save_pretrained(tmp_path / "glpn")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    assert _run("--images", tmp_path / "img", "--out", tmp_path / "out", "--tasks", "depth",
                "--depth-model", tmp_path / "glpn") == 0
    with torch.no_grad():
        metres = model(**processor(images=[_square(rgb)], return_tensors="pt")).predicted_depth
    metres = F.interpolate(metres[:, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    written = np.asarray(Image.open(tmp_path / "out" / "depth" / "a.png"))
    assert written.flat[metres.argmax()] == 0 and written.flat[metres.argmin()] == 65535


def test_a_model_given_by_hub_id_is_fetched_with_its_image_processor(models, tmp_path, monkeypatch):
    """A first download fetches only the files weights.hub names: the processor's json was left out, so every hub
    id of the docs (`depth-anything/Depth-Anything-V2-Large-hf`) failed on a fresh cache (review 53 #3). The hub is
    played by a folder, filtered as huggingface_hub filters a repository's files."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from lvm.annotate.models import load

    def download(repo, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None):
        snapshot = tmp_path / "snapshot"
        for name in filter_repo_objects([p.name for p in models["depth"].iterdir()], allow_patterns=allow_patterns):
            snapshot.mkdir(exist_ok=True)
            shutil.copy(models["depth"] / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    model = load("depth", "org/depth-tiny", torch.device("cpu"))
    assert type(model.processor).__name__ == "DPTImageProcessor"
    assert sorted(p.name for p in (tmp_path / "snapshot").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]


def test_depth_models_of_unknown_meaning_are_refused():
    from types import SimpleNamespace

    from lvm.annotate.models import is_metric

    assert is_metric(SimpleNamespace(model_type="depth_anything", depth_estimation_type="metric"), "m")
    assert not is_metric(SimpleNamespace(model_type="depth_anything", depth_estimation_type="relative"), "m")
    assert is_metric(SimpleNamespace(model_type="tipsv2_dpt"), "m") and not is_metric(SimpleNamespace(model_type="dpt"), "m")
    with pytest.raises(AnnotateError, match=r"canopy/: depth model type 'chmv2' is not supported: .*\(supported: depth_anything, "
                                            r"depth_pro, dpt, glpn, prompt_depth_anything, tipsv2_dpt, zoedepth\)"):
        is_metric(SimpleNamespace(model_type="chmv2"), "canopy/")


def test_padding_of_a_depth_processor_is_cropped_before_resizing():
    """ZoeDepth reflect-pads the square it is given: the depth of the mirrored border must not reach the map."""
    from types import SimpleNamespace

    from transformers import ZoeDepthImageProcessor

    from lvm.annotate.models import Model, predict, preprocess

    class EchoDepth(torch.nn.Module):  # "distance" 1 where the image is bright, 3 where dark: bright = near
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))
            self.config = SimpleNamespace(model_type="zoedepth")

        def forward(self, pixel_values):
            return SimpleNamespace(predicted_depth=2.0 - pixel_values[:, 0])

    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[:, 32:] = 255  # a vertical step at column 32
    processor = ZoeDepthImageProcessor()
    model = Model("depth", "fake", EchoDepth(), processor, {}, {})
    (near,) = predict(model, preprocess(processor, [_square(rgb)]), [(96, 128)])
    edge = int(np.argmax(near[48].numpy() > 0.5))
    assert near.shape == (96, 128) and abs(edge - 32) <= 1


def test_reruns_write_byte_identical_reports(tmp_path, capsys):
    """PIL's message for garbage names the stream's memory address, which must not reach the report."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "coffee.png").write_bytes(_png_of("coffee"))
    (tmp_path / "p" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for out in ("a", "b"):
        assert _run("--images", tmp_path / "p", "--out", tmp_path / out, "--tasks", "edges") == 0
    report = (tmp_path / "a" / "edges" / "p-img-000000.report.json").read_bytes()
    assert report == (tmp_path / "b" / "edges" / "p-img-000000.report.json").read_bytes()
    (skip,) = json.loads(report)["skipped_items"]
    assert skip["detail"] == "UnidentifiedImageError: cannot identify image file <_io.BytesIO object>"


def test_tars_of_one_name_in_two_inputs_are_refused_with_the_annotate_flags(tmp_path, capsys):
    a, b = _tar(tmp_path / "t1" / "000.tar"), _tar(tmp_path / "t2" / "000.tar")
    assert _run("--images", a.parent, b.parent, "--out", tmp_path / "annot", "--tasks", "edges") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {a}: writes the same output shard 000.tar as {b}; give their common parent folder as --images, "
        "or write them into different --out folders")


@pytest.mark.parametrize("files, extra", [(["a/cats/x.png", "b/cats/x.png"], ()),
                                          (["a/x.jpg", "a/x.png"], ("--images-per-shard", "1"))])
def test_two_images_of_one_key_in_two_units_are_refused(tmp_path, capsys, files, extra):
    """Their maps would be one file `<task>/<key>.png`, the later unit's overwriting the earlier's."""
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_working("coffee")).save(tmp_path / name)
    roots = sorted({tmp_path / Path(name).parts[0] for name in files})
    assert _run("--images", *roots, "--out", tmp_path / "annot", "--tasks", "edges", *extra) == 2
    key = Path(files[0]).relative_to(Path(files[0]).parts[0]).with_suffix("")
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / files[0]}: writes the same map <task>/{key}.png as {tmp_path / files[1]}; "
        "annotate them into different --out folders, or rename one")
    assert not (tmp_path / "annot").exists()


def test_a_folder_that_cannot_be_listed_is_a_counted_skip(tmp_path, capsys, deny_listing):
    for name in ("p/ok/a.png", "p/locked/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_png_of("coffee"))
    deny_listing(tmp_path / "p" / "locked")
    assert _run("--images", tmp_path / "p", "--out", tmp_path / "annot", "--tasks", "edges") == 0
    assert "annotate: 1 images annotated (edges 1) in 1 units (0 already complete); skipped 1: unreadable_folder 1;" \
        in capsys.readouterr().out
    report = json.loads((tmp_path / "annot" / "edges" / "p-img-000000.report.json").read_text())
    assert report["skipped"] == {"unreadable_folder": 1}


def test_an_image_replaced_under_its_name_is_annotated_again(tmp_path, capsys):
    """The usual repair of a corrupt image is to fetch it again under the same name: its unit must be redone."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.png").write_bytes(_png_of("coffee"))
    args = ("--images", tmp_path / "p", "--out", tmp_path / "annot", "--tasks", "edges")
    assert _run(*args) == 0
    (tmp_path / "p" / "x.png").write_bytes(_png_of("chelsea"))
    capsys.readouterr()
    assert _run(*args) == 0
    assert "in 1 units (0 already complete)" in capsys.readouterr().out
    edges = np.asarray(Image.open(tmp_path / "annot" / "edges" / "x.png"))
    assert np.array_equal(edges, cv2.Canny(_working("chelsea"), 100, 200))


def test_another_processor_config_redoes_the_depth_maps(photos, models, tmp_path, capsys):
    """The processor decides the model's input (here its size): its config is in the maps' fingerprint."""
    shutil.copytree(models["depth"], tmp_path / "depth")
    args = ("--images", photos, "--out", tmp_path / "annot", "--tasks", "depth", "--depth-model", tmp_path / "depth")
    assert _run(*args) == 0
    config = json.loads((tmp_path / "depth" / "preprocessor_config.json").read_text())
    config["size"] = {"height": 56, "width": 56}
    (tmp_path / "depth" / "preprocessor_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert _run(*args) == 0
    assert "in 1 units (0 already complete)" in capsys.readouterr().out


def test_max_shards_stops_after_that_many_units(photos, tmp_path, capsys):
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges", "--images-per-shard", "2", "--max-shards", "1") == 0
    assert "in 1 units (0 already complete)" in capsys.readouterr().out
    assert [p.name for p in (out / "edges").glob("*.report.json")] == ["photos-img-000000.report.json"]


def test_a_folder_units_maps_are_synced_in_one_pass_before_its_report(photos, tmp_path, monkeypatch):
    """Each map fsynced with its folder on its own cost 1.7-9x more (BENCHMARKS.md); the report marks the unit
    complete, so the maps must be durable before it is written."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("rename", Path(dst).name)) or replace(src, dst))
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    maps = sorted((out / "edges").rglob("*.png"))
    report = out / "edges" / "photos-img-000000.report.json"
    folders = {p.parent.stat().st_ino for p in maps}
    n = len(maps)
    assert sorted(events[:n]) == sorted(("rename", p.name) for p in maps)  # written with no fsync each
    assert sorted(events[n : 2 * n]) == sorted(("fsync", p.stat().st_ino) for p in maps)  # then synced in one pass
    assert sorted(events[2 * n : 2 * n + len(folders)]) == sorted(("fsync", ino) for ino in folders)
    assert events[2 * n + len(folders) :] == [("fsync", report.stat().st_ino), ("rename", report.name),
                                              ("fsync", report.parent.stat().st_ino)]  # then the report


def test_a_lost_map_of_a_folder_unit_is_made_again(photos, tmp_path, capsys):
    """The report alone marked a folder unit complete: maps deleted since were never made again, and a pairs build
    then lacked their partners (review 52 #4). A lost map tar was already made again."""
    out = tmp_path / "annot"
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    report = json.loads((out / "edges" / "photos-img-000000.report.json").read_text())
    assert sorted(report["maps"]) == sorted(PHOTOS)
    lost = out / "edges" / "cat" / "coffee.png"
    lost.unlink()
    capsys.readouterr()
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0
    assert lost.is_file() and "4 images annotated" in capsys.readouterr().out
    assert _run("--images", photos, "--out", out, "--tasks", "edges") == 0  # now complete: nothing redone
    assert "0 images annotated" in capsys.readouterr().out


def test_a_redone_folder_unit_removes_the_maps_of_images_gone_since(photos, tmp_path, capsys):
    """An image deleted after a run kept its map, and tokenizing the task folder read it as an annotation of an image
    that no longer exists (review 52 #5). A redo killed before its report still knows the earlier maps."""
    shutil.copytree(photos, tmp_path / "photos")
    out = tmp_path / "annot"
    assert _run("--images", tmp_path / "photos", "--out", out, "--tasks", "edges") == 0
    (tmp_path / "photos" / "cat" / "coffee.png").unlink()
    (unit,), _ = find_units([str(tmp_path / "photos")])
    with ThreadPoolExecutor(1) as pool:  # a redo killed at its first map
        UnitOutput(out / "edges", "edges", unit, "killed", pool).add("astronaut", lambda: b"a new map")
    assert (out / "edges" / "cat" / "coffee.png").is_file()
    capsys.readouterr()
    assert _run("--images", tmp_path / "photos", "--out", out, "--tasks", "edges") == 0
    assert "3 images annotated" in capsys.readouterr().out
    assert sorted(p.relative_to(out / "edges").as_posix() for p in out.rglob("*.png")) == [
        f"{name}.png" for name in sorted(set(PHOTOS) - {"cat/coffee"})]


def test_an_image_that_moved_to_another_unit_keeps_its_map(tmp_path, capsys):
    """Units are chunks of one sorted listing: deleting b moved d into the first unit, and the second unit, whose
    earlier report listed d, removed the map the first had just written (review 57 #1)."""
    (tmp_path / "img").mkdir()
    for name in "abcdef":
        Image.fromarray(np.full((16, 16, 3), ord(name), np.uint8)).save(tmp_path / "img" / f"{name}.png")
    out = tmp_path / "annot"
    args = ("--images", tmp_path / "img", "--out", out, "--tasks", "edges", "--images-per-shard", "3", "--workers", "0")
    assert _run(*args) == 0
    (tmp_path / "img" / "b.png").unlink()
    assert _run(*args) == 0
    assert sorted(p.stem for p in (out / "edges").glob("*.png")) == ["a", "c", "d", "e", "f"]


def test_a_json_after_its_image_is_no_skipped_image(tmp_path, capsys):
    """`tar cf s.tar *.png *.json`: annotate reads no json and wrote every map, yet said "skipped 2: split_sample 2"
    (review 52 #6)."""
    (tmp_path / "laion").mkdir()
    with tarfile.open(tmp_path / "laion" / "00000.tar", "w") as tar:
        for member, data in [("k1.png", _png_of("astronaut")), ("k2.png", _png_of("chelsea")),
                             ("k1.json", b"{}"), ("k2.json", b"{}")]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _run("--images", tmp_path / "laion", "--out", tmp_path / "annot", "--tasks", "edges") == 0
    assert "annotate: 2 images annotated (edges 2) in 1 units (0 already complete); skipped 0;" in capsys.readouterr().out


def test_tf32_for_the_models_does_not_outlive_the_run(monkeypatch):
    """The run turns TF32 matmuls on for its models on a GPU; the process's later work (the GPU tests after it, a
    tokenize in the same script) kept it (review 63 #5)."""
    import lvm.annotate.pipeline as pipeline

    def annotate(job):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return "summary"

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(pipeline, "_annotate", annotate)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert pipeline.run(None) == "summary"
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
