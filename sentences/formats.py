"""The on-disk formats between the stages, in one place (docs/FORMATS.md describes them in prose).

- Shard patterns: `common.files.expand_shards`, the same for every command that reads shards.
- Token shards (`lvm.tokenize` writes, `sentences.tokens` reads): one sample per image, the tokens of
  each variant in the member `token_member(variant)`, provenance in `json`; beside each its report
  (`token_report`), which names the tokenizer that made it.
- Sentence shards (`sentences.build` writes, the packed stream and `lvm.evaluate` read with
  `read_sentences`): one sample per visual sentence, `tokens.npy` and `json`; beside them `index.json`
  (`SentenceIndex`).
- The tokenizer record (`VQTokenizer.identity()`: name, weights digest, tokens per image, codebook size)
  travels from token-shard reports through `index.json` into checkpoints; `one_tokenizer` refuses a mix.
- Every shard is written through `tar_writer`: atomic (`common.files.atomic_write`) and byte-for-byte
  reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset as wds

from common.files import atomic_write, tar_is_complete, walk
from common.vocab import BOS_ID, EOS_ID, VOCAB_SIZE
from sentences.errors import SentenceError

ORIGINAL = "original"
"""The variant of the image itself, stored as ``<key>.tokens.npy``; a derived variant (``gray``, ``masked``)
is ``<key>.<variant>.tokens.npy``."""

SENTENCE_SHARD = "sentences-{:06d}.tar"
INDEX_NAME = "index.json"
SPEC_NAME = "spec.json"
"""Written by ``sentences.build`` when it starts, before any shard; ``index.json`` comes last, when it is done."""
INDEX_FORMAT = "lvm-sentences/1"
LENGTHS_NAME = "lengths.npy"
"""Beside ``index.json``: every sentence's token count (int64), shard after shard in the order ``index.json`` lists
them. Training resumes from it without re-reading what it consumed (``sentences.stream``); folders without it
(older builds, other tools) resume by reading."""


def token_member(variant: str) -> str:
    """Tar member extension holding the tokens of ``variant`` (``tokens.npy``, ``gray.tokens.npy``...)."""
    return "tokens.npy" if variant == ORIGINAL else f"{variant}.tokens.npy"


def token_report(shard: str | Path) -> Path:
    """The report ``lvm.tokenize`` writes beside the token shard ``<name>.tar``: ``<name>.report.json``."""
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + ".report.json")


def read_report(path: str | Path) -> dict:
    """The json of a shard report (``token_report``, or ``lvm.annotate``'s), {} when it is missing or unreadable:
    a shard without a readable report records nothing and counts as not made by this project's run."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def iter_samples(path: str, on_error: Callable[[Exception], bool] = wds.reraise_exception) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts (``__key__`` plus raw bytes per member extension).

    ``on_error`` is webdataset's handler: return True to skip what failed (a damaged tar ends the shard),
    or raise to stop. A tar cut short between members reaches it too, after the samples before the cut.
    """
    failed = False

    def handler(exn: Exception) -> bool:
        nonlocal failed
        failed = True
        return on_error(exn)

    yield from wds.tarfile_samples([{"url": path}], handler=handler)
    if not failed and not tar_is_complete(path):
        on_error(tarfile.ReadError("cut short (no end-of-archive blocks; a copy that did not finish?)"))


@contextmanager
def tar_writer(path: str | Path, encoder: bool = True) -> Iterator[wds.TarWriter]:
    """A TarWriter that becomes the shard ``path`` only when the block completes (``atomic_write``).

    Member owner, mode and mtime are fixed, so the same samples always give the same bytes. ``encoder=False``
    writes member values as the bytes given.
    """
    with atomic_write(path) as stream:
        # mtime is an int: a float adds a 1 KB pax header per member
        writer = wds.TarWriter(stream, user="", group="", mode=0o644, mtime=0, encoder=encoder)
        try:
            yield writer
        finally:  # also on Ctrl-C: an unclosed writer would write to the closed file when collected (a traceback)
            writer.close()


class ShardSentence(NamedTuple):
    """One sample of a sentence shard: its key, its tokens (1-D, ids in the vocabulary), its raw json."""

    key: str
    tokens: np.ndarray
    json: bytes | None


def read_sentences(path: str, skipped: Counter | None = None) -> Iterator[ShardSentence]:
    """The sentences of one shard in order, every token id checked against the vocabulary.

    A bad sentence (no or an unreadable ``tokens.npy``, not 1-D integers, an id outside the vocabulary, not
    ``[BOS, ..., EOS]``) or a damaged tar (also one cut short between samples) raises SentenceError naming the
    shard and the sentence: training must not silently lose data.
    With ``skipped`` (evaluation), each is counted there by reason instead and left out.
    """

    def bad(key: str, reason: str, detail: str) -> None:
        if skipped is None:
            raise SentenceError(path, f"sentence '{key}': {detail}")
        skipped[reason] += 1

    def on_error(exn: Exception) -> bool:
        if skipped is None:
            raise SentenceError(path, f"damaged tar ({type(exn).__name__}: {exn})") from exn
        skipped[f"unreadable tar ({type(exn).__name__})"] += 1
        return True

    for sample in iter_samples(path, on_error):
        key = sample["__key__"]
        if "tokens.npy" not in sample:
            bad(key, "missing tokens.npy", "no tokens.npy")
            continue
        try:
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        except (ValueError, OSError) as exn:
            bad(key, f"undecodable member ({type(exn).__name__})", f"unreadable tokens.npy ({exn})")
            continue
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            bad(key, "not 1-D integer tokens", f"expected 1-D integer tokens, got {tokens.dtype} {tokens.shape}")
            continue
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB_SIZE):
            worst = int(tokens.max()) if tokens.max() >= VOCAB_SIZE else int(tokens.min())
            bad(key, "id outside the vocabulary", f"token id {worst} outside the vocabulary [0, {VOCAB_SIZE})")
            continue
        if skipped is None and (tokens.size < 2 or tokens[0] != BOS_ID or tokens[-1] != EOS_ID):
            # (evaluation checks the whole layout itself, against the tokens per image, and counts)
            raise SentenceError(path, f"sentence '{key}': not [BOS {BOS_ID}, ..., EOS {EOS_ID}] (token shards of "
                                "lvm.tokenize are not sentences: build sentences from them with python -m sentences.build)")
        yield ShardSentence(key, tokens, sample.get("json"))


@dataclass
class SentenceIndex:
    """``index.json`` beside sentence shards: what ``sentences.build`` wrote. Other tools may omit it; the
    packed stream then counts a shard's tokens by reading it."""

    tokens_per_image: int
    seed: int
    window: int
    tokenizer: dict | None = None
    """the tokenizer that made every token shard (``one_tokenizer``), None when their reports do not say;
    carried into LVM checkpoints, which check the tokenizer they are used with"""
    shards: dict[str, dict] = field(default_factory=dict)
    """shard file name -> ``sentences``, ``tokens``, ``bytes`` (the stream trusts ``tokens`` only at that size)"""
    kinds: dict[str, dict] = field(default_factory=dict)
    """sentence kind -> ``sentences``, ``tokens``"""
    sources: dict[str, dict] = field(default_factory=dict)
    """spec source name -> ``kind``, ``epochs`` (passes over its images), ``sentences``, ``tokens``, ``unused``"""
    skipped: dict[str, dict] = field(default_factory=dict)
    """token shard set -> token samples skipped while loading, by reason"""

    def write(self, folder: str | Path) -> None:
        """``<folder>/index.json``, atomically; its ``format`` field names this schema (INDEX_FORMAT)."""
        with atomic_write(Path(folder) / INDEX_NAME, "w") as f:
            json.dump({"format": INDEX_FORMAT, **dataclasses.asdict(self)}, f, indent=1)
            f.write("\n")


def read_build_record(folder: str | Path) -> dict | None:
    """The ``spec.json`` a sentences.build wrote in ``folder`` when it began (None when there is none): the
    fingerprint of its spec and inputs, which a rerun must match to resume the build."""
    path = Path(folder) / SPEC_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exn:
        raise SentenceError(path, f"unreadable ({exn}); remove {folder} or choose another --out") from None
    if not isinstance(record, dict):
        raise SentenceError(path, f"unreadable (not a json object); remove {folder} or choose another --out")
    return record


def _read_index(folder: str) -> dict:
    """The ``index.json`` in ``folder`` ({} when there is none: shards other tools wrote). A build that has not
    finished (killed, or still running) is an error: its shards are a part of the mixture, without its tail."""
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        if os.path.exists(os.path.join(folder, SPEC_NAME)):
            raise SentenceError(folder or ".", f"a sentences.build that has not finished ({SPEC_NAME} but no "
                                f"{INDEX_NAME}); run it again with the same --spec and --out to complete it") from None
        return {}
    except (OSError, ValueError) as exn:
        raise SentenceError(path, f"unreadable ({exn})") from None
    if not isinstance(index, dict):
        raise SentenceError(path, "unreadable (not a json object)")
    if index.get("format", INDEX_FORMAT) != INDEX_FORMAT:  # another schema's counts would be read wrong
        raise SentenceError(path, f"format {index['format']!r}, this version reads {INDEX_FORMAT!r}; rebuild the sentences")
    return index


def indexed_shards(folder: str) -> dict[str, dict]:
    """The ``shards`` entry of the ``index.json`` in ``folder`` ({} when there is none)."""
    return _read_index(folder).get("shards", {})


def check_folders_whole(patterns: str | Sequence[str], paths: Sequence[str]) -> None:
    """Refuse a sentence folder, named as a folder or below one (the paper-scale layout names the parent of its
    builds), that lacks shards its ``index.json`` lists (`paths`: what the patterns found): a copy that lost files
    would train on the rest without a word, where one shard cut short is refused (``sentences.stream.shard_tokens``).
    A glob or brace pattern may pick a subset."""
    found = {os.path.realpath(path) for path in paths}  # real paths: a link to a build names its shards another way
    for pattern in [patterns] if isinstance(patterns, (str, os.PathLike)) else patterns:
        if not os.path.isdir(pattern):
            continue
        builds = sorted({os.path.dirname(path) for path in walk(str(pattern), []) if os.path.basename(path) == INDEX_NAME})
        for folder in builds:
            listed = indexed_shards(folder)
            missing = sorted(name for name in listed if os.path.realpath(os.path.join(folder, name)) not in found)
            if missing:
                raise SentenceError(os.path.join(folder, missing[0]), f"listed in index.json but not there ({len(missing)} "
                                    f"of {len(listed)} shards missing): copy them again, or rebuild")


def write_lengths(folder: str | Path, lengths: np.ndarray) -> None:
    """``<folder>/LENGTHS_NAME``, atomically: the token count of every sentence of the shards ``index.json`` lists,
    in its order. Write it before ``index.json``, which marks the folder complete."""
    with atomic_write(Path(folder) / LENGTHS_NAME) as f:
        np.save(f, np.asarray(lengths, dtype=np.int64), allow_pickle=False)


def has_lengths(paths: Sequence[str]) -> bool:
    """Whether the ``LENGTHS_NAME`` of their folders gives the sentence lengths of all these shards."""
    return all(os.path.basename(path) in _lengths_of(os.path.dirname(path))[1] for path in paths)


def indexed_lengths(path: str) -> np.ndarray | None:
    """The token count of each sentence of the shard ``path``, in order, from the ``LENGTHS_NAME`` of its folder;
    None when the folder has none or its ``index.json`` does not list the shard with its counts. Lengths that do
    not add up to the index's counts, or of less than a sentence's two tokens, are an error: the file belongs to
    another build."""
    folder, name = os.path.dirname(path), os.path.basename(path)
    lengths, slices = _lengths_of(folder)
    if name not in slices:
        return None
    entry, where = slices[name]
    shard = np.asarray(lengths[where], dtype=np.int64)
    if int(shard.sum()) != int(entry["tokens"]) or (len(shard) and int(shard.min()) < 2):
        raise SentenceError(os.path.join(folder, LENGTHS_NAME), f"{int(shard.sum()):,} tokens in {len(shard):,} "
                            f"sentences of at least {int(shard.min()) if len(shard) else 0} for {name}, index.json lists "
                            f"{int(entry['tokens']):,}: {ANOTHER_BUILD}")
    return shard


ANOTHER_BUILD = "it belongs to another build (remove it to resume by re-reading)"
"""What lengths that do not fit their shards mean, and what to do."""


def _lengths_of(folder: str) -> tuple[np.ndarray, dict[str, tuple[dict, slice]]]:
    """``_folder_lengths`` of the folder's file as it is now; nothing for a folder without one."""
    try:
        stat = os.stat(os.path.join(folder, LENGTHS_NAME))
    except FileNotFoundError:
        return np.empty(0, dtype=np.int64), {}
    return _folder_lengths(folder, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)  # one entry per folder: a reader visits its folders in shuffled order
def _folder_lengths(folder: str, size: int, mtime_ns: int) -> tuple[np.ndarray, dict[str, tuple[dict, slice]]]:
    """A folder's lengths (memory-mapped) and, per shard its index lists, its entry and slice of them; cached for
    the file as it is (its size and modification time). An index whose entries lack their counts (not one
    ``sentences.build`` wrote) places no shard."""
    path = os.path.join(folder, LENGTHS_NAME)
    try:
        lengths = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exn:
        raise SentenceError(path, f"unreadable ({type(exn).__name__}: {exn})") from None
    slices, start = {}, 0
    for name, entry in indexed_shards(folder).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sentences"), int) and isinstance(entry.get("tokens"), int)):
            return lengths, {}
        slices[name] = entry, slice(start, start + entry["sentences"])
        start += entry["sentences"]
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or len(lengths) != start:
        raise SentenceError(path, f"{lengths.dtype} {lengths.shape}, index.json lists {start:,} sentences: {ANOTHER_BUILD}")
    return lengths, slices


def other_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer records with digests make different tokens: other weights, or the same weights under
    another preprocessing (resize, value range) where both record it (records before 2026-12-07 lack it)."""
    return a["digest"] != b["digest"] or bool(a.get("preprocessing") and b.get("preprocessing")) and \
        a["preprocessing"] != b["preprocessing"]


def one_tokenizer(records: Iterable[tuple[str, dict | None]]) -> dict | None:
    """The tokenizer that made all of some shards, from (shard, ``VQTokenizer.identity()`` or None) pairs.

    None when no shard records one; two tokenizers (`other_tokenizer`) mean tokens of both mixed together,
    which no model can learn from, so that is an error naming a shard of each.
    """
    found: tuple[str, dict] | None = None
    for path, record in records:
        if not isinstance(record, dict) or not record.get("digest"):
            continue
        if found is None:
            found = path, record
        elif other_tokenizer(record, found[1]):
            how = "" if record["digest"] != found[1]["digest"] else \
                f" under other preprocessing ({record['preprocessing']} against {found[1]['preprocessing']})"
            raise SentenceError(
                path,
                f"made by tokenizer {record.get('name')} (digest {str(record['digest'])[:12]}), but {found[0]} by "
                f"{found[1].get('name')} (digest {str(found[1]['digest'])[:12]}){how}; tokenize everything with one "
                "tokenizer",
            )
    return None if found is None else found[1]


def token_shards_tokenizer(paths: Sequence[str]) -> dict | None:
    """The tokenizer recorded in the reports of these token shards (None if none does; a report that is missing
    or unreadable records nothing, as for shards other tools made)."""

    return one_tokenizer((path, read_report(token_report(path)).get("tokenizer")) for path in paths)


def tokens_per_image(paths: Sequence[str]) -> int | None:
    """The tokens per image the ``index.json`` of these shards' folders records (None when none says); folders that
    record two sizes are images of two tokenizers, an error even where no tokenizer record says so."""
    sizes: dict[int, str] = {}
    for folder in sorted({os.path.dirname(p) for p in paths}):
        size = _read_index(folder).get("tokens_per_image")
        if isinstance(size, int):
            sizes.setdefault(size, folder)
    if len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise SentenceError(second, f"{b} tokens per image, but {first} holds {a}: sentences of two tokenizers; "
                                    "tokenize everything with one tokenizer")
    return next(iter(sizes), None)


def longest_sentence(paths: Sequence[str]) -> int | None:
    """The tokens of the longest sentence of these shards, from their folders' ``LENGTHS_NAME`` (None when none says;
    a damaged file says nothing here: a resume, which needs it, reports it)."""
    longest = None
    for path in paths:
        try:
            found = indexed_lengths(path)
        except SentenceError:
            continue
        if found is not None and len(found):
            longest = max(longest or 0, int(found.max()))
    return longest


def sentences_tokenizer(paths: Sequence[str]) -> dict | None:
    """The tokenizer recorded in the ``index.json`` of the folders holding these sentence shards (None if none)."""
    folders = sorted({os.path.dirname(path) for path in paths})
    return one_tokenizer((folder, _read_index(folder).get("tokenizer")) for folder in folders)
