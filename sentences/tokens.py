"""Token shards (the output of ``python -m lvm.tokenize``) loaded into memory as one array per variant.

The builders draw images in any order (random video starts, pairing by key, category pools, reshuffles over
epochs), so a source's tokens are held in memory: 512 bytes per image and variant at 256 tokens, plus its json.
Corpora larger than memory are built as several specs (for example one per range of shards) into separate
folders; the packed stream reads them all together.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from common.vocab import CODEBOOK_SIZE
from sentences.errors import SentenceError
from sentences.formats import iter_samples, token_member, token_shards_tokenizer


@dataclass
class TokenSet:
    """The images of one token shard set: row ``i`` of every array in ``tokens`` is image ``i``.

    ``name`` is the role of the set in its source: ``image`` for the source images, the task name (``depth``,
    ``normals``...) for an annotation set.
    """

    name: str
    shards: list[str]
    shard_of: np.ndarray  # int32 [rows]: index into ``shards``
    keys: list[str]
    meta: list[dict]
    tokens: dict[str, np.ndarray]  # variant -> uint16 [rows, tokens_per_image]
    tokenizer: dict | None = None  # VQTokenizer.identity() from the shards' reports; None if not recorded

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def tokens_per_image(self) -> int:
        return next(iter(self.tokens.values())).shape[1]

    def provenance(self, row: int, variant: str) -> dict:
        """Where image ``row`` came from, as written into the sentence json."""
        return {
            "set": self.name,
            "variant": variant,
            "shard": self.shards[self.shard_of[row]],
            "key": self.keys[row],
            "meta": self.meta[row],
        }

    def rows_by_key(self) -> dict[str, int]:
        """Row of each sample key, for pairing sets by key; a key seen twice cannot be paired, so it is an error."""
        rows: dict[str, int] = {}
        for row, key in enumerate(self.keys):
            if key in rows:
                first = self.shards[self.shard_of[rows[key]]]
                raise SentenceError(
                    f"{self.shards[self.shard_of[row]]}: key '{key}' also in {first}; "
                    f"the {self.name} set cannot be paired by key"
                )
            rows[key] = row
        return rows


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """A json object with its keys interned: every image's json repeats the same keys (img2dataset's ~17), and a
    build holds millions of them (measured on a 0.5 KB LAION json: 2.2 -> 1.3 KB per image, parsing ~1.5x slower)."""
    return {sys.intern(key): value for key, value in pairs}


def load_token_set(name: str, paths: Sequence[str], variants: Sequence[str], skipped: Counter) -> TokenSet:
    """Read every sample of ``paths`` that has all ``variants``; count the others in ``skipped`` by reason.

    Corrupt data (a truncated tar, unreadable npy or json, a missing variant) is skipped and counted. Data that
    cannot be right (ids outside the codebook, a token count different from the other images) raises
    SentenceError: it means a wrong or mixed tokenizer, and skipping would hide that.
    """
    keys: list[str] = []
    meta: list[dict] = []
    shard_of: list[int] = []
    rows: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    length: int | None = None

    for index, path in enumerate(tqdm(paths, desc=f"load {name}", unit="shard", leave=False)):
        errors: list[Exception] = []  # a damaged tar ends its shard; webdataset may report it more than once
        seen: set[str] = set()
        for sample in iter_samples(path, on_error=lambda exn: not errors.append(exn)):
            key = sample["__key__"]
            if key in seen:  # webdataset groups adjacent members only: a second part would be read as another image
                raise SentenceError(f"{path}: sample '{key}' comes twice: its files are not next to each other in the "
                                    "tar (a shard keeps each sample's files together, as lvm.tokenize writes them)")
            seen.add(key)
            arrays = {}
            for variant in variants:
                raw = sample.get(token_member(variant))
                if raw is None:
                    skipped[f"missing {token_member(variant)}"] += 1
                    break
                try:
                    array = np.load(io.BytesIO(raw), allow_pickle=False)
                except Exception:  # noqa: BLE001 - any unparseable npy is corruption, counted and skipped
                    skipped[f"unreadable {token_member(variant)}"] += 1
                    break
                where = f"{path}: sample '{key}': {token_member(variant)}"
                if array.ndim != 1 or array.dtype.kind not in "iu" or not array.size:
                    raise SentenceError(f"{where}: expected a 1-D integer array of an image's tokens, got {array.dtype} "
                                        f"{array.shape}")
                if length is None:
                    length = array.size
                if array.size != length:
                    raise SentenceError(f"{where}: {array.size} tokens, but the other images have {length}")
                if array.size and (array.min() < 0 or array.max() >= CODEBOOK_SIZE):
                    worst = int(array.min()) if array.min() < 0 else int(array.max())
                    raise SentenceError(f"{where}: token id {worst} outside the codebook [0, {CODEBOOK_SIZE})")
                arrays[variant] = array.astype(np.uint16)
            else:
                try:
                    info = json.loads(sample["json"], object_pairs_hook=_json_object) if "json" in sample else {}
                except ValueError:
                    skipped["unreadable json"] += 1
                    continue
                if not isinstance(info, dict):  # valid json, but no record of the image (`null`, a string)
                    skipped["json not an object"] += 1
                    continue
                keys.append(key)
                meta.append(info)
                shard_of.append(index)
                for variant, array in arrays.items():
                    rows[variant].append(array)
        if errors:
            skipped[f"damaged tar shard {path} (the rest of it lost)"] += 1  # named: the one to copy again
    if not keys:
        raise SentenceError(f"{paths[0]}: no usable samples in the {name} shards ({dict(skipped) or 'empty'})")
    return TokenSet(
        name=name,
        shards=list(paths),
        shard_of=np.asarray(shard_of, dtype=np.int32),
        keys=keys,
        meta=meta,
        tokens={v: np.stack(r) for v, r in rows.items()},
        tokenizer=token_shards_tokenizer(paths),
    )


def check_same_length(sets: Sequence[TokenSet]) -> int:
    """Tokens per image shared by all ``sets``; different counts mean different tokenizers, an error."""
    first = sets[0]
    for other in sets[1:]:
        if other.tokens_per_image != first.tokens_per_image:
            raise SentenceError(
                f"{other.shards[0]}: {other.tokens_per_image} tokens per image, but {first.shards[0]} has "
                f"{first.tokens_per_image} (token shards from different tokenizers?)"
            )
    return first.tokens_per_image
