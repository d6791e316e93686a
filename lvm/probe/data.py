"""Labelled images -> tokens, through the tokenize pipeline (its sources, decoding, preprocessing and encoder).

Two layouts, as `--train`/`--val` give them (folders, globs or brace patterns, like `lvm.tokenize --shards`):
- an ImageFolder: one subfolder per class under the folder named, images anywhere below it;
- webdataset / img2dataset tar shards whose json member carries the label (`--label-field`, default `label`).
Unreadable images are skipped and counted with the tokenize pipeline's reasons; images without a label
(files directly in the folder, samples without the field) are counted as `no_label`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

import tokenizer
from common.errors import leave_stop_signals_to_main
from common.files import IMAGE_SUFFIXES, expand_pattern, walk
from common.options import decoding_start_method
from lvm.probe import ProbeError
from lvm.probe.cache import Cache
from lvm.tokenize.decode import MEMBERS_ONLY
from lvm.tokenize.pipeline import Encoder, Options, Resize, UnitBatches
from lvm.tokenize.sources import TAR_SUFFIX, Unit, find_units

IMAGES_PER_UNIT = 256  # images of a folder per DataLoader work unit: enough units to keep every worker busy


@dataclass
class Split:
    """One split's images as tokens, in a fixed order (sorted by source and key)."""

    keys: list[str]
    labels: list[str]  # class name of each image (a folder name, or the label field's value as text)
    tokens: np.ndarray  # uint16 [N, tokens_per_image]
    skipped: Counter  # reason -> count


def check_class_folders(specs: list[str]) -> None:
    """Every class folder of an ImageFolder must hold an image: an empty one is a mistake worth one line, and
    one that cannot be listed (permissions) is said to be so rather than empty. A glob or brace pattern that matches
    folders is refused: the class is the first folder under where the pattern starts (`br/{a,b}/train` gave classes
    a and b), so the ImageFolders must be given as paths of their own."""
    for spec in specs:
        if any(os.path.isdir(path) for name, found in expand_pattern(spec) if name != spec or glob.has_magic(spec)
               for path in found):
            raise ProbeError(spec, "a pattern that matches folders: give each ImageFolder as a path (the shell expands "
                                   "br/*/train into them), so that classes are the folders under each")
        root = Path(spec)
        if not root.is_dir() or any(root.glob(f"*{TAR_SUFFIX}")):
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            unlisted: list[OSError] = []
            if any(Path(f).suffix.lower() in IMAGE_SUFFIXES or f.endswith(TAR_SUFFIX) for f in walk(str(folder), unlisted)):
                continue
            if unlisted:
                raise ProbeError(unlisted[0].filename, f"cannot list the folder ({unlisted[0].strerror.lower()})")
            raise ProbeError(folder, "empty class folder (no images)")


def _units(specs: list[str], option: str) -> list[Unit]:
    units, missing = find_units(specs, images_per_shard=IMAGES_PER_UNIT, inputs_flag=None)  # writes no shards
    units = [u for u in units if u.kind in ("images", "tar")]  # videos in a class folder are not images
    if missing:
        raise ProbeError(missing[0], f"no such file (named by {option})")
    if not units:
        raise ProbeError(specs[0], "no images or tar shards")
    return units


def _inputs_digest(units: list[Unit], label_field: str) -> str:
    """Which files, as they are now (size and mtime), under which label field."""
    digest = hashlib.sha1(label_field.encode())
    for unit in units:
        digest.update(unit.inputs_digest().encode())  # relative paths, sizes and mtimes
    return digest.hexdigest()


def _label(unit: Unit, meta: dict, label_field: str) -> str | None:
    if unit.kind == "images":  # rel path class/.../x.jpg -> class
        folder = meta.get("folder", "")
        return folder.split("/")[0] if folder else None
    value = meta.get(label_field)
    return None if value is None or isinstance(value, (dict, list)) else str(value)


def read_split(
    name: str,
    specs: list[str],
    tok: tokenizer.VQTokenizer,
    tokenizer_fingerprint: str,
    cache: Cache,
    label_field: str = "label",
    batch_size: int = 64,
    workers: int = 0,
) -> Split:
    """Tokenize a split's labelled images, or take its tokens from the cache when inputs and tokenizer match."""
    check_class_folders(specs)
    units = _units(specs, f"--{name}")
    fingerprint = hashlib.sha1(f"{tokenizer_fingerprint}:{_inputs_digest(units, label_field)}".encode()).hexdigest()
    cached = cache.read(f"{name}_tokens", fingerprint)
    if cached is not None:
        tokens, meta = cached
        return Split(meta["keys"], meta["labels"], np.asarray(tokens), Counter(meta["skipped"]))
    encode = Encoder(tok)
    resize = Resize(tok.image_size, tok.config.resize, tok.config.value_range)
    loader = DataLoader(UnitBatches(units, Options(), resize, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=encode.cuda, worker_init_fn=leave_stop_signals_to_main,
                        multiprocessing_context=decoding_start_method(workers))
    rows: list[tuple[str, str, np.ndarray]] = []
    skipped: Counter = Counter()
    total = None if any(u.kind == "tar" for u in units) else sum(len(u.items) for u in units)
    with tqdm(total=total, desc=f"tokenize {name}", unit="image") as bar:
        for batch in loader:
            unit = units[batch.unit]
            codes = encode(batch.pixels) if batch.keys else None
            for row, (key, meta) in enumerate(zip(batch.keys, batch.metas)):
                label = _label(unit, json.loads(meta), label_field)
                if label is None:
                    skipped["no_label"] += 1
                else:
                    rows.append((f"{unit.name}/{key}", label, codes[row]))
            skipped.update(skip.reason for skip in batch.skips if skip.reason not in MEMBERS_ONLY)  # counted as no_label
            bar.update(len(batch.keys) + len(batch.skips))
    if not rows:
        raise ProbeError(specs[0], f"no labelled images (skipped: {dict(skipped) or 'none'})")
    rows.sort(key=lambda r: r[0])  # workers finish units in any order
    split = Split([r[0] for r in rows], [r[1] for r in rows], np.stack([r[2] for r in rows]), skipped)
    cache.write(f"{name}_tokens", fingerprint, split.tokens, {"keys": split.keys, "labels": split.labels,
                                                             "skipped": dict(skipped)})
    return split


def class_indices(train: Split, val: Split, val_option: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, train label indices, val label indices): the train split defines the classes, numeric
    labels in numeric order; a val class the probes never saw in training is an error."""
    classes = sorted(set(train.labels), key=lambda c: (0, int(c), c) if re.fullmatch(r"-?[0-9]+", c) else (1, 0, c))
    if len(classes) < 2:
        raise ProbeError("--train", f"needs at least 2 classes, found {len(classes)} ({', '.join(classes)})")
    unknown = sorted(set(val.labels) - set(classes))
    if unknown:
        raise ProbeError(val_option, f"class {unknown[0]!r} is not among the {len(classes)} train classes")
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[c] for c in train.labels]), np.array([index[c] for c in val.labels])
