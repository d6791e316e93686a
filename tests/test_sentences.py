"""Visual sentences built from tiny token shards: every kind's layout, the mixing spec, the build CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from common.files import expand_shards
from common.vocab import BOS_ID, EOS_ID
from lvm.tokenize.derive import apply_mask, gray, mask_params
from sentences import build as build_module
from sentences.build import build, main
from sentences.errors import SentenceError
from sentences.formats import LENGTHS_NAME, ORIGINAL, read_report, token_member
from sentences.kinds import _group_chunks
from sentences.spec import load_spec
from sentences.stream import PackedStream
from sentences.tokens import load_token_set

N = 16  # tokens per image of the tiny tokenizer
IMAGES = 24  # images 0..23: image i holds codes i*N .. i*N+N-1
GRAY, MASKED, DEPTH, NORMALS = 2000, 3000, 4000, 5000  # code offsets of the derived images and annotations
VIDEO = 6000  # frame f of video v holds codes VIDEO + (v*20 + f)*N ...


def codes(first: int) -> np.ndarray:
    return np.arange(first, first + N, dtype=np.uint16)


def write_tokens(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards: images (with gray and masked variants), depth and normals sets, and videos."""
    root = tmp_path_factory.mktemp("tokens")
    images = [
        {
            "__key__": f"img{i:03d}",
            "tokens.npy": codes(i * N),
            "gray.tokens.npy": codes(GRAY + i * N),
            "masked.tokens.npy": codes(MASKED + i * N),
            "json": {"key": f"img{i:03d}", "folder": f"cat{i % 4}", "path": f"cat{i % 4}/{i:03d}.jpg"},
        }
        for i in range(IMAGES)
    ]
    write_tokens(root / "images" / "a.tar", images[:12])
    write_tokens(root / "images" / "b.tar", images[12:])
    # depth is missing for image 23; normals come in another order and split differently
    write_tokens(
        root / "depth" / "0.tar", [{"__key__": f"img{i:03d}", "tokens.npy": codes(DEPTH + i * N)} for i in range(23)]
    )
    write_tokens(
        root / "normals" / "0.tar",
        [{"__key__": f"img{i:03d}", "tokens.npy": codes(NORMALS + i * N)} for i in reversed(range(IMAGES))],
    )
    frames = [(v, f) for v in range(3) for f in range((20, 20, 1)[v])]  # video 2 has one frame: too short
    rng = np.random.default_rng(0)
    write_tokens(
        root / "videos" / "0.tar",
        [
            {
                "__key__": f"v{v}_{f:03d}",
                "tokens.npy": codes(VIDEO + (v * 20 + f) * N),
                "json": {"video": f"v{v}.mp4", "frame": f * 2, "fps": 30.0},
            }
            for v, f in (frames[i] for i in rng.permutation(len(frames)))  # stored out of order
        ],
    )
    return root


def image_of(tokens: np.ndarray) -> int:
    """The code offset identifying one image slot (its first code)."""
    assert np.array_equal(tokens, codes(int(tokens[0]))), "image slot is not one whole image"
    return int(tokens[0])


def run_build(tmp_path: Path, sources: list[dict], **top) -> tuple[dict, list[tuple[str, list[int], dict]]]:
    """Build a spec; returns index.json and every sentence as (key, image offsets, json)."""
    spec_path = tmp_path / "mix.yaml"
    spec_path.write_text(
        yaml.safe_dump({"seed": 3, "window": 16 * N, "sentences_per_shard": 7, **top, "sources": sources})
    )
    out = tmp_path / "out"
    build(load_spec(spec_path), out)
    index = json.loads((out / "index.json").read_text())
    sentences, lengths = [], []
    for shard in sorted(out.glob("sentences-*.tar")):
        listed, counted = index["shards"][shard.name], {"sentences": 0, "tokens": 0}
        for sample in wds.tarfile_samples([{"url": str(shard)}]):
            t = np.load(io.BytesIO(sample["tokens.npy"]))
            counted["sentences"] += 1
            counted["tokens"] += len(t)
            lengths.append(len(t))
            assert t.dtype == np.uint16 and t[0] == BOS_ID and t[-1] == EOS_ID
            assert (len(t) - 2) % N == 0 and not np.isin(t[1:-1], [BOS_ID, EOS_ID]).any()
            info = json.loads(sample["json"])
            slots = [image_of(t[1 + j * N : 1 + (j + 1) * N]) for j in range((len(t) - 2) // N)]
            assert len(info["images"]) == len(slots)
            sentences.append((sample["__key__"], slots, info))
        # the stream trusts these counts without reading the shard: they must be what it holds
        assert counted == {k: listed[k] for k in ("sentences", "tokens")} and listed["bytes"] == shard.stat().st_size
    # a resume finds its place from these lengths without reading the shards
    assert list(index["shards"]) == sorted(index["shards"]) and np.load(out / LENGTHS_NAME).tolist() == lengths
    return index, sentences


def test_single_images_each_once_with_bos_eos(tmp_path: Path, tokens: Path) -> None:
    index, sentences = run_build(tmp_path, [{"name": "one", "kind": "single", "shards": str(tokens / "images")}])
    assert sorted(s[0] for _, s, _ in sentences) == [i * N for i in range(IMAGES)]
    assert index["kinds"]["single"] == {"sentences": IMAGES, "tokens": IMAGES * (N + 2)}
    _, slots, info = sentences[0]
    assert info["kind"] == "single" and info["images"][0]["key"] == f"img{slots[0] // N:03d}"
    assert info["images"][0]["meta"]["folder"] == f"cat{slots[0] // N % 4}"


def test_video_clips_are_consecutive_frames_at_each_stride(tmp_path: Path, tokens: Path) -> None:
    index, sentences = run_build(
        tmp_path,
        [
            {
                "name": "vid",
                "kind": "video",
                "shards": str(tokens / "videos"),
                "frames": 6,
                "strides": [1, 5],
                "epochs": 3,
            }
        ],
    )
    starts = {1: set(), 3: set()}
    for _, slots, info in sentences:
        frames = [(s - VIDEO) // N for s in slots]
        video, first = divmod(frames[0], 20)
        steps = np.diff(frames)
        # always 6 frames, as in the release: 6 frames at stride 5 would need 26, so 20 frames take stride 3
        assert len(frames) == 6 and len(set(steps)) == 1 and steps[0] in (1, 3)
        assert all(f // 20 == video for f in frames)  # one video, in frame order
        assert [m["meta"]["frame"] for m in info["images"]] == [2 * (f % 20) for f in frames]
        starts[int(steps[0])].add((video, first))
    assert len(sentences) == 2 * 2 * 3  # 2 usable videos x 2 strides x 3 epochs; video 2 is too short
    assert len(starts[1]) > 2 and len(starts[3]) > 2  # random starts differ between epochs
    assert index["sources"]["vid"]["unused"] == {"groups with fewer than 6 frames": 1}


def test_video_clips_from_every_start_are_each_window_once(tmp_path: Path, tokens: Path) -> None:
    """Random starts drawn over several passes held the same window twice (the demo's 18 held-out video sentences
    held 14 distinct windows, review 46 #4); `starts: every` gives each window once, at each stride."""
    _, sentences = run_build(tmp_path, [{"name": "vid", "kind": "video", "shards": str(tokens / "videos"),
                                         "frames": 6, "strides": [1, 5], "starts": "every"}])
    windows = sorted(tuple((s - VIDEO) // N for s in slots) for _, slots, _ in sentences)
    expected = sorted(tuple(range(v * 20 + start, v * 20 + start + 6 * stride, stride))[:6]
                      for v in (0, 1) for stride in (1, 3) for start in range(20 - 5 * stride))
    assert windows == expected and len(windows) == 2 * (15 + 5)  # stride 5 does not fit 20 frames: 3 does
    (tmp_path / "bad").mkdir()
    with pytest.raises(SentenceError, match=r"sources\[0\]\.starts: expected one of random, every, got 'all'$"):
        run_build(tmp_path / "bad", [{"name": "vid", "kind": "video", "shards": str(tokens / "videos"), "starts": "all"}])
    with pytest.raises(SentenceError, match=r"sources\[0\]\.starts: 'every' gives every clip once, so it takes "
                                            r"epochs: 1 .*got epochs: 2$"):  # two passes gave every window twice
        run_build(tmp_path / "bad", [{"name": "vid", "kind": "video", "shards": str(tokens / "videos"),
                                      "starts": "every", "epochs": 2}])


def test_a_plan_that_cannot_fit_in_memory_is_refused_before_it_grows(tmp_path: Path, tokens: Path) -> None:
    """`epochs: 100000` (or tokens far past the sources) planned every sentence in memory, silently, until the OOM
    killer came (review 59 #2)."""
    with pytest.raises(SentenceError, match=r"source 'vid' asks for 1e\+09 passes of \d+ sentences: the plan alone "
                                            r"would take ~\d+ GB, more than this machine's \d+ GB"):
        run_build(tmp_path, [{"name": "vid", "kind": "video", "shards": str(tokens / "videos"), "frames": 4,
                              "epochs": 1e9}])


def test_an_option_added_later_at_its_old_behaviour_leaves_earlier_builds_resumable(tmp_path: Path, tokens: Path) -> None:
    """`starts` joined every video source's recorded options: a build begun before it was "another spec" after an
    upgrade, though `starts: random` writes the same bytes (review 53 #1). At that value it is not recorded."""
    spec = tmp_path / "mix.yaml"
    for starts, recorded in (("random", {"frames": 16, "strides": [8], "group_by": "video", "order_by": "frame"}),
                             ("every", {"frames": 16, "strides": [8], "group_by": "video", "order_by": "frame",
                                        "starts": "every"})):
        spec.write_text(yaml.safe_dump({"sources": [{"name": "vid", "kind": "video", "shards": str(tokens / "videos"),
                                                     "starts": starts}]}))
        assert load_spec(spec).to_json()["sources"][0]["options"] == recorded  # as builds of 7a7bafd recorded it


def test_sequences_draw_a_stride_at_which_the_folder_holds_all_frames(tmp_path: Path, tokens: Path) -> None:
    """The release's rule for frame folders: a stride from [1, min(4, (length - 1) // 15)]."""
    _, sentences = run_build(
        tmp_path, [{"name": "seq", "kind": "sequence", "shards": str(tokens / "videos"), "frames": 8, "epochs": 20}]
    )
    steps = {int(np.diff([(s - VIDEO) // N for s in slots])[0]) for _, slots, _ in sentences}
    assert all(len(slots) == 8 for _, slots, _ in sentences) and steps == {1, 2}  # 20 frames: 8 fit at 1 or 2
    (tmp_path / "capped").mkdir()
    _, sentences = run_build(tmp_path / "capped", [{"name": "seq", "kind": "sequence", "shards": str(tokens / "videos"),
                                                    "frames": 8, "strides": [3, 4]}])
    steps = {int(np.diff([(s - VIDEO) // N for s in slots])[0]) for _, slots, _ in sentences}
    assert steps == {2}  # no stride of the spec fits: the largest that does, not 1


def test_pairs_follow_keys_and_reshuffle_over_epochs(tmp_path: Path, tokens: Path) -> None:
    index, sentences = run_build(
        tmp_path,
        [
            {
                "name": "depth",
                "kind": "pairs",
                "shards": str(tokens / "images"),
                "annotations": {"depth": str(tokens / "depth")},
                "pairs": 4,
                "epochs": 2,
            }
        ],
    )
    groups = {0: set(), 1: set()}
    for _, slots, info in sentences:
        assert len(slots) in (8, 2 * (23 % 4))  # 23 keys in 4-pair sentences: the last one is shorter
        for x, y in zip(slots[0::2], slots[1::2]):
            assert x < GRAY and y == DEPTH + x  # [x1, y1, x2, y2, ...] paired by key
        assert [m["set"] for m in info["images"]] == ["image", "depth"] * (len(slots) // 2)
        assert [m["key"] for m in info["images"]][0::2] == [m["key"] for m in info["images"]][1::2]
        groups[info["epoch"]].add(frozenset(slots[0::2]))
    assert sum(len(s) for _, s, _ in sentences) == 2 * 2 * 23  # image 23 has no depth
    assert groups[0] != groups[1]
    assert index["sources"]["depth"]["unused"] == {"image samples without a partner in every set": 1}


@pytest.mark.parametrize(
    ("kind", "offset", "variant"), [("colorization", GRAY, "gray"), ("inpainting", MASKED, "masked")]
)
def test_derived_pairs_put_the_derived_image_first(
    tmp_path: Path, tokens: Path, kind: str, offset: int, variant: str
) -> None:
    _, sentences = run_build(tmp_path, [{"name": kind, "kind": kind, "shards": str(tokens / "images")}])
    seen = []
    for _, slots, info in sentences:
        assert len(slots) == 16 or len(slots) == 2 * (IMAGES % 8)
        for derived, original in zip(slots[0::2], slots[1::2]):
            assert derived == offset + original
            seen.append(original)
        assert [m["variant"] for m in info["images"]] == [variant, "original"] * (len(slots) // 2)
    assert sorted(seen) == [i * N for i in range(IMAGES)]


@pytest.mark.parametrize("kind", ["colorization", "pairs"])
def test_group_by_keeps_each_sentences_pairs_in_one_group(tmp_path: Path, tokens: Path, kind: str) -> None:
    source = {"name": kind, "kind": kind, "shards": str(tokens / "images"), "pairs": 4, "group_by": "folder"}
    if kind == "pairs":
        source["annotations"] = {"normals": str(tokens / "normals")}
    _, sentences = run_build(tmp_path, [source])
    seen = []
    for _, slots, info in sentences:
        folders = [m["meta"]["folder"] for m in info["images"] if m["set"] == "image"]
        assert len(set(folders)) == 1  # every pair of the sentence from one folder (cat0..cat3, 6 images each)
        assert len(slots) in (8, 4)  # 6 images of a folder in 4-pair sentences: 4 + 2
        seen += [m["key"] for m in info["images"] if m["variant"] == "original" and m["set"] == "image"]
    assert sorted(seen) == [f"img{i:03d}" for i in range(IMAGES)]  # each image once per pass


@pytest.mark.parametrize("seed", range(5))
def test_group_runs_follow_each_groups_first_place_and_keep_the_order_within(seed: int) -> None:
    """The runs a pass of grouped pairs is cut into, against the plain definition (a scan per group, which grew as
    images x groups): groups in the order their first row comes, rows in pass order, runs of at most `size`."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, rng.integers(1, 40), size=rng.integers(1, 300))
    order = rng.permutation(len(groups))
    size = int(rng.integers(1, 9))
    expected = []
    for group in dict.fromkeys(groups[order].tolist()):
        rows = order[groups[order] == group]
        expected += [rows[i : i + size] for i in range(0, len(rows), size)]
    got = _group_chunks(order, groups, size)
    assert [run.tolist() for run in got] == [run.tolist() for run in expected]


def test_token_sets_hold_each_json_key_once(tokens: Path) -> None:
    """A build holds every image's json: the keys, the same in each, are one string each (interned), the values
    as json.loads gives them."""
    found = load_token_set("images", expand_shards(str(tokens / "images")), [ORIGINAL], Counter())
    first, second = found.meta[0], found.meta[1]
    assert first == {"key": "img000", "folder": "cat0", "path": "cat0/000.jpg"}
    assert all(a is b for a, b in zip(first, second))  # the same key objects, not copies


def test_a_json_that_cannot_group_or_order_names_its_shard_and_sample(tmp_path: Path, tokens: Path) -> None:
    """Errors named the set's first shard, not the one holding the sample (review 44 #4)."""
    source = {"name": "c", "kind": "colorization", "shards": str(tokens / "images"), "group_by": "video"}
    with pytest.raises(SentenceError, match=r"a\.tar: sample 'img000': no 'video' in its json to group by \(24 images "
                                            r"of the set lack it\)$"):
        run_build(tmp_path, [source])
    write_tokens(tmp_path / "v" / "0.tar", [{"__key__": f"f{f}", "tokens.npy": codes(VIDEO + f * N),
                                             "json": {"video": "v", "frame": f}} for f in range(3)])
    write_tokens(tmp_path / "v" / "1.tar", [{"__key__": "bad", "tokens.npy": codes(VIDEO + 3 * N),
                                             "json": {"video": "v", "frame": None}}])
    (tmp_path / "b").mkdir()
    with pytest.raises(SentenceError, match=r"1\.tar: sample 'bad': json field 'frame' is None, which cannot order it "
                                            r"among its video's frames \(such as 0\)$"):
        run_build(tmp_path / "b", [{"name": "v", "kind": "video", "shards": str(tmp_path / "v"), "frames": 2}])
    # every value an object: no two compare, and the search for one of another type found none (review 65 #4)
    write_tokens(tmp_path / "o" / "0.tar", [{"__key__": f"f{f}", "tokens.npy": codes(VIDEO + f * N),
                                             "json": {"video": "v", "frame": {"t": f}}} for f in range(3)])
    (tmp_path / "c").mkdir()
    with pytest.raises(SentenceError, match=r"0\.tar: sample 'f\d': json field 'frame' is \{'t': \d\}, which cannot "
                                            r"order it among its video's frames"):
        run_build(tmp_path / "c", [{"name": "v", "kind": "video", "shards": str(tmp_path / "o"), "frames": 2}])


def test_category_groups_k_images_of_n_different_categories(tmp_path: Path, tokens: Path) -> None:
    index, sentences = run_build(
        tmp_path, [{"name": "cat", "kind": "category", "shards": str(tokens / "images"), "categories": 2, "images": 3}]
    )
    used = []
    for _, slots, info in sentences:
        cats = [s // N % 4 for s in slots]
        assert len(slots) == 6 and len(set(cats[:3])) == 1 and len(set(cats[3:])) == 1 and cats[0] != cats[3]
        assert [m["meta"]["folder"] for m in info["images"]] == [f"cat{c}" for c in cats]
        used += slots
    assert len(used) == len(set(used)) == 24  # 4 categories x 6 images: all used, none twice


def test_category_draws_big_categories_more_so_all_run_out_together(tmp_path: Path) -> None:
    """Categories of 24, 6, 6 and 6 images: drawn in proportion to what they have left, a pass leaves few images
    unused; drawn uniformly, the three small ones run out first. Mean left over per pass, 60 passes: 8.6..9.9
    over build seeds 0..5 (integer draws from NumPy's seeded generator), 15.2 when drawn uniformly."""
    sizes = [24, 6, 6, 6]
    write_tokens(
        tmp_path / "tok" / "0.tar",
        [{"__key__": f"c{c}_{i:02d}", "tokens.npy": codes((c * 24 + i) * N), "json": {"folder": f"cat{c}"}}
         for c, size in enumerate(sizes) for i in range(size)],
    )
    passes = 60
    index, _ = run_build(
        tmp_path, [{"name": "cat", "kind": "category", "shards": str(tmp_path / "tok"), "categories": 2, "images": 3,
                    "epochs": passes}]
    )
    left_over = index["sources"]["cat"]["unused"]["images left over at the end of a pass (summed over passes)"]
    assert left_over / passes < 12, left_over / passes


def test_multitask_permutes_task_order_per_sentence_across_three_shots(tmp_path: Path, tokens: Path) -> None:
    annotations = {"depth": str(tokens / "depth"), "normals": str(tokens / "normals")}
    _, sentences = run_build(
        tmp_path,
        [
            {
                "name": "mt",
                "kind": "multitask",
                "shards": str(tokens / "images"),
                "annotations": annotations,
                "epochs": 3,
            }
        ],
    )
    orders = set()
    for _, slots, info in sentences:
        sets = [m["set"] for m in info["images"]]
        shots = len(slots) // 3  # 23 keys: 7 sentences of 3 shots and one of 2
        assert shots in (3, 2) and sets == sets[:3] * shots and sorted(sets[:3]) == ["depth", "image", "normals"]
        for shot in range(shots):
            keys = {m["key"] for m in info["images"][3 * shot : 3 * shot + 3]}
            assert len(keys) == 1  # one image and its own annotations
            base = {"image": 0, "depth": DEPTH, "normals": NORMALS}
            image = {slots[3 * shot + j] - base[sets[j]] for j in range(3)}
            assert len(image) == 1
        orders.add(tuple(sets[:3]))
    assert len(orders) > 2
    assert len(sentences) == 3 * (23 // 3 + 1)  # 23 keys in all three sets, 3 shots, shorter last sentence


def test_sources_are_shuffled_together_and_draw_independently(tmp_path: Path, tokens: Path) -> None:
    """The shards mix the sources (not one source after another), and two sources of one kind over the same images
    group them differently (each source's draws are keyed by its name)."""
    sources = [{"name": name, "kind": "pairs", "shards": str(tokens / "images"),
                "annotations": {"depth": str(tokens / "depth")},
                "pairs": 2} for name in ("depth", "normals")]  # as if two annotation sets of the same keys
    _, sentences = run_build(tmp_path, [*sources, {"name": "one", "kind": "single", "shards": str(tokens / "images")}])
    order = [info["source"] for _, _, info in sentences]  # shard by shard, as written
    assert sum(a != b for a, b in zip(order, order[1:])) > 10  # 3 sources in a row would change twice
    images = {name: {tuple(sorted(slots[0::2])) for _, slots, info in sentences if info["source"] == name}
              for name in ("depth", "normals")}
    assert len(images["depth"]) == len(images["normals"]) and images["depth"] != images["normals"]


def test_multiview_groups_by_folder_in_path_order(tmp_path: Path, tokens: Path) -> None:
    _, sentences = run_build(
        tmp_path, [{"name": "mv", "kind": "multiview", "shards": str(tokens / "images"), "frames": 4}]
    )
    assert len(sentences) == 4  # one clip per folder per pass
    for _, slots, info in sentences:
        assert len(slots) == 4 and len({s // N % 4 for s in slots}) == 1 and slots == sorted(slots)
        assert [m["meta"]["path"] for m in info["images"]] == sorted(m["meta"]["path"] for m in info["images"])


def test_multiview_orders_paths_naturally(tmp_path: Path) -> None:
    """frame2 before frame10, as the files are listed in any file browser."""
    views = [(f"v{n}", f"teddy/frame{n}.jpg") for n in (10, 1, 2)]
    write_tokens(
        tmp_path / "tok" / "0.tar",
        [{"__key__": key, "tokens.npy": codes(n * N), "json": {"folder": "teddy", "path": path}}
         for n, (key, path) in enumerate(views)],
    )
    _, sentences = run_build(tmp_path, [{"name": "mv", "kind": "multiview", "shards": str(tmp_path / "tok"), "frames": 3}])
    ((_, _, info),) = sentences
    assert [m["meta"]["path"] for m in info["images"]] == ["teddy/frame1.jpg", "teddy/frame2.jpg", "teddy/frame10.jpg"]


def test_multiview_shots_follow_their_views_with_the_masks_beside_them(tmp_path: Path) -> None:
    """The release's CO3D layout: per shot, k views of one object then the mask of each, `shots` objects a sentence;
    a mask pairs with the view of the same file name in the folder beside the view's (object/images, object/masks)."""
    views, masks = [], []
    for obj in range(3):
        for frame in range(6):
            views.append({"__key__": f"o{obj}/images/f{frame}", "tokens.npy": codes((obj * 10 + frame) * N),
                          "json": {"folder": f"o{obj}/images", "path": f"o{obj}/images/f{frame}.jpg"}})
            if (obj, frame) != (2, 5):  # one view without its mask
                name = f"f{frame}.jpg.geometric.png" if obj == 1 else f"f{frame}.png"  # CO3D names depth maps so
                masks.append({"__key__": f"o{obj}/masks/f{frame}", "tokens.npy": codes(4000 + (obj * 10 + frame) * N),
                              "json": {"folder": f"o{obj}/masks", "path": f"o{obj}/masks/{name}"}})
    write_tokens(tmp_path / "views" / "0.tar", views)
    write_tokens(tmp_path / "masks" / "0.tar", masks[::-1])  # another order: pairing is by path, not by row
    index, sentences = run_build(tmp_path, [{
        "name": "co3d", "kind": "multiview", "shards": str(tmp_path / "views"), "frames": 2, "strides": [1, 2],
        "shots": 2, "annotations": {"masks": str(tmp_path / "masks")}, "epochs": 10}], window=8 * N)
    assert index["sources"]["co3d"]["unused"] == {"views without a masks image beside them": 1}
    objects_seen, strides = set(), set()
    for _, slots, info in sentences:
        shots = [slots[i : i + 4] for i in range(0, len(slots), 4)]
        assert len(shots) in (1, 2) and len(slots) == 4 * len(shots)  # 3 objects a pass: 2 shots, then 1
        assert [m["set"] for m in info["images"]] == ["image", "image", "masks", "masks"] * len(shots)
        objects = [shot[0] // N // 10 for shot in shots]
        assert len(set(objects)) == len(objects)  # each shot another object
        for shot in shots:
            v1, v2, m1, m2 = (slot // N for slot in shot)
            assert v1 // 10 == v2 // 10 and (m1 - 250, m2 - 250) == (v1, v2)  # one object, each view's own mask
            strides.add(v2 - v1)
        objects_seen.update(objects)
    assert objects_seen == {0, 1, 2} and strides == {1, 2}
    assert sorted(len(slots) // 4 for _, slots, _ in sentences) == [1] * 10 + [2] * 10  # each pass: 2 shots, then 1
    with pytest.raises(SentenceError, match=r"sentences of 8 images x \d+ tokens exceed the window"):
        run_build(tmp_path, [{"name": "co3d", "kind": "multiview", "shards": str(tmp_path / "views"), "frames": 2,
                              "shots": 2, "annotations": {"masks": str(tmp_path / "masks")}}], window=7 * N)


def test_multiview_views_stored_flat_pair_with_the_map_at_their_own_path(tmp_path: Path) -> None:
    """`teddy_42/frame001.jpg` with lvm.annotate's `teddy_42/frame001.png`: every object has a frame001, and each view
    must get its own object's map (a rule by the folder beside the view's would give them all one object's)."""
    views, maps = [], []
    for obj in range(3):
        for frame in range(2):
            views.append({"__key__": f"o{obj}/f{frame}", "tokens.npy": codes((obj * 10 + frame) * N),
                          "json": {"folder": f"o{obj}", "path": f"o{obj}/f{frame}.jpg"}})
            maps.append({"__key__": f"o{obj}/f{frame}", "tokens.npy": codes(4000 + (obj * 10 + frame) * N),
                         "json": {"folder": f"o{obj}", "path": f"o{obj}/f{frame}.png"}})
    write_tokens(tmp_path / "views" / "0.tar", views)
    write_tokens(tmp_path / "depth" / "0.tar", maps[::-1])
    source = {"name": "mv", "kind": "multiview", "shards": str(tmp_path / "views"), "frames": 2,
              "annotations": {"depth": str(tmp_path / "depth")}}
    index, sentences = run_build(tmp_path, [source], window=4 * N)
    assert len(sentences) == 3 and not index["sources"]["mv"].get("unused")
    for _, slots, _ in sentences:
        v1, v2, m1, m2 = (slot // N for slot in slots)
        assert (m1 - 250, m2 - 250) == (v1, v2)
    # CO3D's rule (a folder beside the view's) with two such folders: no guess
    write_tokens(tmp_path / "co3d" / "0.tar", [
        {"__key__": f"o0/{folder}/f{frame}", "tokens.npy": codes(4000 + frame * N), "json": {"path": f"o0/{folder}/f{frame}.png"}}
        for folder in ("masks", "depth") for frame in range(2)])
    with pytest.raises(SentenceError, match="view 'o0/images/f0.jpg' has two depth images, 'o0/masks/f0.png' and "
                                            "'o0/depth/f0.png'"):
        write_tokens(tmp_path / "co3dviews" / "0.tar", [
            {"__key__": f"o0/images/f{frame}", "tokens.npy": codes(frame * N), "json": {"path": f"o0/images/f{frame}.jpg"}}
            for frame in range(2)])
        run_build(tmp_path, [{**source, "shards": str(tmp_path / "co3dviews"),
                              "annotations": {"depth": str(tmp_path / "co3d")}}], window=4 * N)


def test_derived_slots_hold_the_tokens_of_the_gray_and_masked_pictures(tmp_path: Path, tiny_tokenizer) -> None:
    """Token shards made as the tokenize step makes them (lvm.tokenize.derive on pixels, then the tokenizer):
    each slot must hold the tokens of the intended picture: gray, masked or the original, of the right key."""
    torch.manual_seed(0)
    pixels = torch.rand(5, 3, 64, 64)
    as_uint8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    grays = torch.stack([gray(p) for p in pixels])
    masks = [mask_params(f"k{i}", 0) for i in range(5)]
    masked = torch.stack([apply_mask(p, m) for p, m in zip(pixels, masks)])
    assert torch.equal(grays[:, 0], grays[:, 1]) and torch.equal(grays[:, 0], grays[:, 2])  # really gray
    enc = {
        name: tiny_tokenizer.encode(as_uint8(x)).numpy().astype(np.uint16)
        for name, x in [("color", pixels), ("gray", grays), ("masked", masked)]
    }
    write_tokens(
        tmp_path / "tok" / "0.tar",
        [
            {
                "__key__": f"k{i}",
                "tokens.npy": enc["color"][i],
                "gray.tokens.npy": enc["gray"][i],
                "masked.tokens.npy": enc["masked"][i],
                "json": {"mask": masks[i]},
            }
            for i in range(5)
        ],
    )
    spec = {
        "seed": 0,
        "window": 16 * tiny_tokenizer.tokens_per_image,
        "sources": [
            {"name": "c", "kind": "colorization", "shards": str(tmp_path / "tok"), "pairs": 5},
            {"name": "i", "kind": "inpainting", "shards": str(tmp_path / "tok"), "pairs": 5},
        ],
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")
    n = tiny_tokenizer.tokens_per_image
    for sample in wds.tarfile_samples([{"url": str(tmp_path / "out" / "sentences-000000.tar")}]):
        t = np.load(io.BytesIO(sample["tokens.npy"]))
        info = json.loads(sample["json"])
        derived = "gray" if info["kind"] == "colorization" else "masked"
        for j, image in enumerate(info["images"]):
            i = int(image["key"][1:])
            expected = enc[derived if j % 2 == 0 else "color"][i]
            assert np.array_equal(t[1 + j * n : 1 + (j + 1) * n], expected)
            if j % 2 == 0:
                assert image["meta"]["mask"] == masks[i]
        assert len(info["images"]) == 10 and len(t) == 10 * n + 2
    # a random tiny tokenizer cannot reconstruct, so "decodes to the intended picture" is checked as
    # "holds exactly the tokens of the intended picture" (decoding is a function of the tokens)


def test_build_is_deterministic_and_resumes_after_a_kill(
    tmp_path: Path, tokens: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {
        "seed": 5,
        "window": 16 * N,
        "sentences_per_shard": 5,
        "sources": [
            {"name": "one", "kind": "single", "shards": str(tokens / "images"), "epochs": 1.5},
            {"name": "vid", "kind": "video", "shards": str(tokens / "videos"), "strides": [1, 2]},
            {"name": "col", "kind": "colorization", "shards": str(tokens / "images"), "pairs": 2},
        ],
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    assert main(["--spec", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "a")]) == 0

    real = build_module.tar_writer
    calls = []

    def dies_on_third_shard(path):
        calls.append(path)
        if len(calls) == 3:
            Path(str(path) + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt  # killed mid-write
        return real(path)

    monkeypatch.setattr(build_module, "tar_writer", dies_on_third_shard)
    with pytest.raises(SystemExit) as exit_info:  # Ctrl-C: "interrupted", exit 130
        main(["--spec", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 130
    assert len(list((tmp_path / "b").glob("sentences-*.tar"))) == 2 and not (tmp_path / "b" / "index.json").exists()
    with pytest.raises(SentenceError, match="a sentences.build that has not finished .* run it again"):
        PackedStream(str(tmp_path / "b"), seq_len=16, batch_size=1)  # training would get two shards of ten
    monkeypatch.setattr(build_module, "tar_writer", real)
    assert main(["--spec", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and not any(f.endswith(".tmp") for f in files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["sources"]["one"] == {
        "kind": "single",
        "epochs": 1.5,
        "sentences": 36,
        "tokens": 36 * (N + 2),
        "unused": {},
    }
    assert index["kinds"]["video"]["sentences"] == 4 and index["kinds"]["colorization"]["sentences"] == 12
    assert (
        sum(s["sentences"] for s in index["shards"].values())
        == 52
        == sum(k["sentences"] for k in index["kinds"].values())
    )
    # A build made before lengths.npy existed: the same command again adds it and leaves the shards as they are.
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("sentences-*.tar")}
    (tmp_path / "a" / LENGTHS_NAME).unlink()
    assert main(["--spec", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / LENGTHS_NAME).read_bytes() == (tmp_path / "b" / LENGTHS_NAME).read_bytes()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("sentences-*.tar")} == shards
    # ... unless the earlier run's index.json says it planned other shards (another version's planning)
    index["shards"]["sentences-000001.tar"]["tokens"] += 1
    (tmp_path / "a" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SentenceError, match=r"sentences-000001.tar: kept from the earlier run, whose index.json lists "
                       r"\{.*\}, but this build plans \{.*\}: build into a new --out"):
        build(load_spec(tmp_path / "mix.yaml"), tmp_path / "a")


def test_tokens_mode_weights_set_each_sources_share(tmp_path: Path, tokens: Path) -> None:
    index, _ = run_build(
        tmp_path,
        [
            {"name": "one", "kind": "single", "shards": str(tokens / "images"), "weight": 1},
            {"name": "col", "kind": "colorization", "shards": str(tokens / "images"), "weight": 3},
        ],
        tokens=4000,
    )
    single, color = index["kinds"]["single"]["tokens"], index["kinds"]["colorization"]["tokens"]
    assert abs(single - 1000) <= N + 2 and abs(color - 3000) <= 16 * N + 2
    assert index["sources"]["one"]["epochs"] == pytest.approx(1000 / (IMAGES * (N + 2)), abs=1e-3)


def test_summary_reports_counts_per_kind_and_skips_corrupt_samples(
    tmp_path: Path, tokens: Path, capsys: pytest.CaptureFixture
) -> None:
    write_tokens(
        tmp_path / "bad" / "0.tar",
        [
            {"__key__": "good", "tokens.npy": codes(0)},
            {"__key__": "broken", "tokens.npy": b"not an npy file"},
            {"__key__": "nogray", "json": {}},
        ],
    )
    # a tar cut inside the tokens of its third sample (samples of 4096 bytes, the tokens' data 3584 bytes in)
    write_tokens(
        tmp_path / "bad" / "1.tar", [{"__key__": f"t{i}", "tokens.npy": codes(N), "json": {}} for i in range(3)]
    )
    (tmp_path / "bad" / "1.tar").write_bytes((tmp_path / "bad" / "1.tar").read_bytes()[: 2 * 4096 + 3584 + 80])
    spec = {
        "sources": [
            {"name": "bad", "kind": "single", "shards": str(tmp_path / "bad")},
            {"name": "vid", "kind": "video", "shards": str(tokens / "videos")},
        ]
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    assert main(["--spec", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[single]") and line.split()[1:] == ["3", "54"] for line in out)
    assert any(line.startswith("[video]") and line.split()[1:] == ["2", "516"] for line in out)  # 16 frames at stride 1
    skipped = f"skipped in {tmp_path / 'bad' / '0.tar'} (2 shards): "
    # the cut sample arrives without its tokens: counted as missing them, and its shard as damaged
    damaged = f"1 damaged tar shard {tmp_path / 'bad' / '1.tar'} (the rest of it lost)"
    # one line for the damaged set; none, not an empty one, for the clean source ...
    assert [line for line in out if line.startswith("skipped in ")] == [
        skipped + f"1 unreadable tokens.npy; 2 missing tokens.npy; {damaged}"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert list(index["skipped"]) == [f"{tmp_path / 'bad' / '0.tar'} (2 shards)"]  # ... and no empty entry
    assert out[-1].startswith("built 5 sentences (570 tokens, 2 kinds) into 1 shards in ")
    assert out[-1].endswith(f"; skipped: 1 unreadable tokens.npy, 2 missing tokens.npy, {damaged}")


def test_a_json_that_is_no_object_is_skipped_and_counted(tmp_path: Path) -> None:
    """Valid json but no record of the image (`null`, a string): the builders read its fields, so it is skipped."""
    samples = [{"__key__": f"k{i}", "tokens.npy": codes(i * N), "json": {"folder": "a", "path": f"a/{i}.jpg"}}
               for i in range(4)]
    samples[1]["json"], samples[2]["json"] = b"null", b'"folder: a"'
    write_tokens(tmp_path / "tok" / "0.tar", samples)
    index, sentences = run_build(tmp_path, [{"name": "mv", "kind": "multiview", "shards": str(tmp_path / "tok"),
                                             "frames": 2}])
    assert [[slot // N for slot in slots] for _, slots, _ in sentences] == [[0, 3]]
    assert index["skipped"] == {f"{tmp_path / 'tok' / '0.tar'} (1 shards)": {"json not an object": 2}}


def test_shards_read_for_two_variant_sets_count_each_loss_once(tmp_path: Path) -> None:
    """A single and a colorization source over the same shards read them for the originals and again for the gray
    pictures: one broken sample and one damaged shard are still one and one."""
    gray = token_member("gray")
    samples = [{"__key__": f"k{i}", "tokens.npy": codes(i * N), gray: codes(i * N)} for i in range(8)]
    samples[1]["tokens.npy"] = b"not an npy file"
    write_tokens(tmp_path / "tok" / "0.tar", samples)
    write_tokens(tmp_path / "tok" / "1.tar", samples[2:])
    shard = tmp_path / "tok" / "1.tar"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    index, _ = run_build(tmp_path, [{"name": "one", "kind": "single", "shards": str(tmp_path / "tok")},
                                    {"name": "col", "kind": "colorization", "shards": str(tmp_path / "tok")}])
    (counts,) = index["skipped"].values()
    assert counts["unreadable tokens.npy"] == 1 and counts[f"damaged tar shard {shard} (the rest of it lost)"] == 1


def test_a_token_shard_cut_between_samples_is_counted_and_named(tmp_path: Path) -> None:
    """tarfile reads a tar cut between members as a shorter, complete one; the missing end-of-archive blocks
    tell, so the images lost are not lost silently."""
    write_tokens(tmp_path / "tok" / "0.tar", [{"__key__": f"k{i}", "tokens.npy": codes(i * N)} for i in range(6)])
    shard = tmp_path / "tok" / "0.tar"
    with tarfile.open(shard) as tar:
        boundary = tar.getmembers()[4].offset  # before the 5th sample
    shard.write_bytes(shard.read_bytes()[:boundary])
    index, sentences = run_build(tmp_path, [{"name": "s", "kind": "single", "shards": str(tmp_path / "tok")}])
    assert len(sentences) == 4
    assert index["skipped"] == {f"{shard} (1 shards)": {f"damaged tar shard {shard} (the rest of it lost)": 1}}


BAD_SPECS = [
    (
        {"sources": [{"name": "a", "kind": "vidoe", "shards": "{tok}/videos"}]},
        "sources[0].kind: unknown kind 'vidoe' (one of: single, video,",
    ),
    (
        {"sources": [{"name": "a", "kind": "video", "shards": "{tok}/videos", "stride": 2}]},
        "sources[0].stride: unknown field for kind video",
    ),
    (
        {"sources": [{"name": "a", "kind": "video", "shards": "{tok}/videos", "frames": 0}]},
        "sources[0].frames: expected a positive integer, got 0",
    ),
    (
        {"sources": [{"name": "a", "kind": "single", "shards": "{tok}/nothing"}]},
        "sources[0].shards: {tok}/nothing: no .tar shards found",
    ),
    (
        {"sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "weight": 2}]},
        "sources[0].weight: needs a total 'tokens'",
    ),
    (
        {"sources": [{"name": "a", "kind": "pairs", "shards": "{tok}/images"}]},
        "sources[0].annotations: kind pairs takes exactly 1 annotation sets, got 0",
    ),
    (
        {
            "sources": [
                {"name": "a", "kind": "single", "shards": "{tok}/images"},
                {"name": "a", "kind": "single", "shards": "{tok}/images"},
            ]
        },
        "sources[1].name: 'a' used twice",
    ),
    ({"seed": 1, "source": []}, "source: unknown field"),
    ({"window": 512, "sources": [{"name": "v", "kind": "video", "shards": "{tok}/videos", "frames": 25}]},
     "source 'v' makes no sentences (3 groups with fewer than 25 frames)"),  # with epochs too: no empty success
    ({"sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "epochs": float("nan")}]},
     "sources[0].epochs: expected a positive number, got nan"),
    ({"sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "epochs": float("inf")}]},
     "sources[0].epochs: expected a positive number, got inf"),
    ({"tokens": "2e6", "sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "weight": 1}]},
     "tokens: expected a positive integer, got '2e6' (YAML reads 1e3 as text: write 1000 or 1.0e+3)"),
    ({"sources": [{"name": "a", "kind": "video", "shards": "{tok}/videos", "frames": 1}]},
     "sources[0].frames: a clip needs at least 2 frames, got 1"),
    ({"sources": [{"name": "a", "kind": "video", "shards": "{tok}/videos", "frames": "16"}]},
     "sources[0].frames: expected a positive integer, got '16'$"),  # no hint about 1e3: it has no exponent
    ({"sources": [{"name": "a", "kind": ["single"], "shards": "{tok}/images"}]},
     "sources[0].kind: unknown kind ['single'] (one of: "),  # was a TypeError traceback (review 44 #3, #5)
    ({"sources": [{"name": "laion\n", "kind": "single", "shards": "{tok}/images"}]},
     "sources[0].name: expected letters, digits, '-' or '_', got 'laion\\n'"),  # `$` let a final newline in
    (
        {"tokens": 1000, "window": 512,
         "sources": [{"name": "a", "kind": "video", "shards": "{tok}/videos", "frames": 21, "weight": 1}]},
        "source 'a' makes no sentences (3 groups with fewer than 21 frames)",
    ),
    ({"sources": [{"name": "a", "kind": "single", "shards": "{tok}/images"},
                  {"name": "cat", "kind": "category", "shards": "{tok}/images", "categories": 9, "images": 2}]},
     "sources[1] (cat): {tok}/images/a.tar: 4 categories ('folder') have at least 2 images, 9 needed per sentence"),
    ({"sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "epochs": 0.01}]},
     "source 'a' gets no sentences: 0.01 passes of 24 sentences (raise its epochs or weight, or the tokens)"),
    ({"tokens": 100000, "sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "weight": 1000},
                                    {"name": "b", "kind": "single", "shards": "{tok}/images", "weight": 0.001}]},
     "source 'b' gets no sentences"),
    ({"tokens": 1000, "sources": [{"name": "a", "kind": "single", "shards": "{tok}/images", "epochs": 5}]},
     "sources[0].epochs: not allowed with a total 'tokens' (give a weight instead)"),
    ({"sources": [{"name": "a", "kind": "pairs", "shards": "{tok}/images", "annotations": {"image": "{tok}/depth"}}]},
     "sources[0].annotations: bad task name 'image'"),
    ({"sources": [{"name": "a", "kind": "multiview", "shards": "{tok}/images",
                   "annotations": {"depth": "{tok}/depth", "normals": "{tok}/normals"}}]},
     "sources[0].annotations: kind multiview takes at most 1 annotation sets, got 2"),
    (
        {"window": 64, "sources": [{"name": "a", "kind": "colorization", "shards": "{tok}/images"}]},
        "sources[0] (a): sentences of 16 images x 16 tokens exceed the window of 64 tokens "
        "(at most 4 images fit)",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_spec_is_one_line_naming_the_field(tmp_path: Path, tokens: Path, capsys, spec: dict, message: str) -> None:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec).replace("{tok}", str(tokens)))
    with pytest.raises(SystemExit) as exit_info:
        main(["--spec", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    err = err[err.find("error: "):]  # after what a cleared progress bar leaves on the line (cursor moves)
    expected = f"error: {path}: {message.replace('{tok}', str(tokens))}"
    assert err == expected[:-1] if expected.endswith("$") else err.startswith(expected)  # `$`: the whole line
    assert not (tmp_path / "out").exists()  # nothing claimed: the corrected spec may use the same --out


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (
            {"__key__": "x", "tokens.npy": np.arange(8, dtype=np.uint16)},
            "sample 'x': tokens.npy: 8 tokens, but the other images have 16",
        ),
        (
            {"__key__": "x", "tokens.npy": np.full(N, 8192, dtype=np.uint16)},
            "sample 'x': tokens.npy: token id 8192 outside the codebook [0, 8192)",
        ),
        (
            {"__key__": "x", "tokens.npy": np.r_[np.int16(-1), np.full(N - 1, 5, dtype=np.int16)]},
            "sample 'x': tokens.npy: token id -1 outside the codebook [0, 8192)",
        ),
        (
            {"__key__": "x", "tokens.npy": np.zeros((4, 4), dtype=np.uint16)},
            "sample 'x': tokens.npy: expected a 1-D integer array of an image's tokens, got uint16 (4, 4)",
        ),
        (  # it built sentences of BOS and EOS alone (review 65 #1)
            {"__key__": "x", "tokens.npy": np.zeros(0, dtype=np.uint16)},
            "sample 'x': tokens.npy: expected a 1-D integer array of an image's tokens, got uint16 (0,)",
        ),
    ],
)
def test_wrong_tokens_are_an_error_naming_shard_and_sample(tmp_path: Path, sample: dict, message: str) -> None:
    write_tokens(tmp_path / "tok" / "0.tar", [{"__key__": "a", "tokens.npy": codes(0)}, sample])
    (tmp_path / "mix.yaml").write_text(
        yaml.safe_dump({"sources": [{"name": "a", "kind": "single", "shards": str(tmp_path / "tok")}]})
    )
    with pytest.raises(
        SentenceError,
        match="^" + re.escape(f"{tmp_path / 'tok' / '0.tar'}: {message}"),
    ):
        build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")


def test_an_output_folder_with_shards_of_unknown_origin_is_refused(tmp_path: Path, tokens: Path) -> None:
    """Shards without spec.json (another tool's, or a build whose spec.json was removed) cannot count as this build's."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sentences-000000.tar").write_bytes(b"")
    (tmp_path / "mix.yaml").write_text(
        yaml.safe_dump({"sources": [{"name": "one", "kind": "single", "shards": str(tokens / "images")}]})
    )
    with pytest.raises(SentenceError, match="holds sentence shards without spec.json; remove them or choose another"):
        build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")
    for damaged, problem in (("[]", "not a json object"), ("not json", "Expecting value")):  # review 56 #7: tracebacks
        (tmp_path / "out" / "spec.json").write_text(damaged)
        with pytest.raises(SentenceError, match=f"^{tmp_path / 'out' / 'spec.json'}: unreadable \\({problem}"):
            build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")


def test_another_spec_cannot_reuse_an_output_folder(tmp_path: Path, tokens: Path) -> None:
    run_build(tmp_path, [{"name": "one", "kind": "single", "shards": str(tokens / "images")}])
    (tmp_path / "mix.yaml").write_text(
        yaml.safe_dump({"seed": 4, "sources": [{"name": "one", "kind": "single", "shards": str(tokens / "images")}]})
    )
    with pytest.raises(SentenceError, match="holds a build of another spec or other inputs"):
        build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")


def test_shards_retokenized_at_the_same_size_are_other_inputs(tmp_path: Path, tokens: Path) -> None:
    """Another tokenizer keeps every shard's size; its report's fingerprint is what tells the inputs apart."""
    shards = tmp_path / "tok"
    shards.mkdir()
    (shards / "a.tar").write_bytes((tokens / "images" / "a.tar").read_bytes())
    (shards / "a.report.json").write_text(json.dumps({"fingerprint": "tokenizer one"}))
    run_build(tmp_path, [{"name": "one", "kind": "single", "shards": str(shards)}])
    (shards / "a.report.json").write_text(json.dumps({"fingerprint": "tokenizer two"}))
    with pytest.raises(SentenceError, match="holds a build of another spec or other inputs"):
        build(load_spec(tmp_path / "mix.yaml"), tmp_path / "out")


def test_a_report_that_is_no_json_object_counts_as_missing(tmp_path: Path) -> None:
    """Resume checks read reports with .get(): a list, null or a torn file must read as "not made by this run"."""
    for name, text in [("list.json", "[]"), ("null.json", "null"), ("torn.json", '{"tokenizer": '), ("ok.json", '{"a": 1}')]:
        (tmp_path / name).write_text(text)
    assert [read_report(tmp_path / n) for n in ("list.json", "null.json", "torn.json", "missing.json", "ok.json")] == [
        {}, {}, {}, {}, {"a": 1}]


def test_a_video_listed_twice_and_a_sample_split_in_its_tar_are_refused(tmp_path: Path) -> None:
    """The same video tokenized into two folders became clips stepping through both copies (stride 2 read as 1);
    a tar with its jsons first gave every image an empty json (review 44 #3, #7)."""
    frames = [{"__key__": f"f{f}", "tokens.npy": codes(VIDEO + f * N), "json": {"video": "v", "frame": f}}
              for f in range(4)]
    write_tokens(tmp_path / "run1" / "0.tar", frames)
    write_tokens(tmp_path / "run2" / "0.tar", frames)
    (tmp_path / "a").mkdir()
    with pytest.raises(SentenceError, match=r"run2/0\.tar: sample 'f0': the same video and frame as .*run1/0\.tar: "
                                            r"sample 'f0' \('v', 0\): is a video listed twice\?$"):
        run_build(tmp_path / "a", [{"name": "v", "kind": "video", "frames": 2, "strides": [1],
                                    "shards": [str(tmp_path / "run1"), str(tmp_path / "run2")]}])
    with tarfile.open(tmp_path / "split.tar", "w") as tar:  # every json, then every tokens.npy
        for member, data in [(f"f{f}.json", json.dumps({"video": "v", "frame": f}).encode()) for f in range(2)] + \
                            [(f"f{f}.tokens.npy", _npy(codes(f * N))) for f in range(2)]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "b").mkdir()
    with pytest.raises(SentenceError, match=r"split\.tar: sample 'f0' comes twice: its files are not next to each "
                                            r"other in the tar"):
        run_build(tmp_path / "b", [{"name": "v", "kind": "single", "shards": str(tmp_path / "split.tar")}])


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_key_given_twice_in_the_spec_is_refused(tmp_path: Path, tokens: Path, capsys) -> None:
    """PyYAML keeps the last of two equal keys without a word: `epochs: 1, epochs: 2` built 2 epochs (review 44 #15)."""
    spec = tmp_path / "mix.yaml"
    spec.write_text(f"sources:\n  - name: a\n    kind: single\n    shards: {tokens / 'images'}\n    epochs: 1\n"
                    "    epochs: 2\n")
    with pytest.raises(SystemExit):
        main(["--spec", str(spec), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {spec}: line 2: 'epochs' given twice in one mapping"
    # a merge key shares a source's fields, and a field given beside it overrides the merged one (review 53 #6)
    spec.write_text(f"sources:\n  - &a {{name: a, kind: video, shards: {tokens / 'videos'}, frames: 4}}\n"
                    "  - <<: *a\n    name: b\n    frames: 6\n")
    assert [(s.name, s.options["frames"]) for s in load_spec(spec).sources] == [("a", 4), ("b", 6)]


def test_an_out_inside_an_input_folder_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """The first build succeeded, and every rerun, the resume after a crash included, read its own sentence shards
    as token shards (review 44 #4)."""
    write_tokens(tmp_path / "tok" / "a.tar", [{"__key__": f"k{i}", "tokens.npy": codes(i * N)} for i in range(3)])
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({"sources": [{"name": "s", "kind": "single", "shards": str(tmp_path / "tok")}]}))
    with pytest.raises(SystemExit):
        main(["--spec", str(spec), "--out", str(tmp_path / "tok" / "sent")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'tok' / 'sent'}: --out is inside the input folder {tmp_path / 'tok'} (sources[0], s); a "
        "rerun would read its sentence shards as token shards: choose an --out outside the inputs")
    assert not (tmp_path / "tok" / "sent").exists()


def test_an_out_holding_the_inputs_builds_and_one_a_pattern_names_is_refused(tmp_path: Path, capsys) -> None:
    """`--out proj` with inputs in proj/tok was refused (review 53 #4), though a build writes only
    proj/sentences-*.tar, which `proj/tok` never names; a glob that names them is refused before the first run."""
    write_tokens(tmp_path / "proj" / "tok" / "a.tar", [{"__key__": f"k{i}", "tokens.npy": codes(i * N)} for i in range(3)])
    spec = tmp_path / "mix.yaml"
    for pattern in (str(tmp_path / "proj" / "tok"), str(tmp_path / "proj" / "*" / "*.tar")):
        spec.write_text(yaml.safe_dump({"sources": [{"name": "s", "kind": "single", "shards": pattern}]}))
        for _ in range(2):  # the build, then a rerun that finds it complete
            main(["--spec", str(spec), "--out", str(tmp_path / "proj")])
        assert "(1 already done)" in capsys.readouterr().out
        for output in (tmp_path / "proj").glob("*.*"):
            output.unlink()
    for pattern in (str(tmp_path / "proj" / "**" / "*.tar"), str(tmp_path / "proj" / "*")):  # `*`: the folder too
        spec.write_text(yaml.safe_dump({"sources": [{"name": "s", "kind": "single", "shards": pattern}]}))
        with pytest.raises(SystemExit):
            main(["--spec", str(spec), "--out", str(tmp_path / "proj")])
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'proj'}: --out is matched by {pattern} (sources[0], s); a rerun would read its "
            "sentence shards as token shards: choose an --out outside the inputs")


def test_a_spec_that_is_not_utf8_or_not_yaml_is_one_line(tmp_path: Path) -> None:
    """A comment saved in Latin-1 was a UnicodeDecodeError traceback (review 65)."""
    (tmp_path / "latin1.yaml").write_bytes(b"# caf\xe9 photos\nseed: 0\n")
    with pytest.raises(SentenceError, match=r"latin1\.yaml: not UTF-8 text \(byte 5: invalid continuation byte\)$"):
        load_spec(tmp_path / "latin1.yaml")
    (tmp_path / "bad.yaml").write_text("sources: [\n")
    with pytest.raises(SentenceError, match=r"bad\.yaml: not valid YAML \("):
        load_spec(tmp_path / "bad.yaml")
