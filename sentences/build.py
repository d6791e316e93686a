"""``python -m sentences.build --spec mix.yaml --out sentences/``: token shards to shuffled sentence shards.

The build loads every source's token shards, draws each source's passes with its builder (``sentences.kinds``),
shuffles all sentences together and writes them as ``sentences-NNNNNN.tar`` shards plus ``index.json``
(sentence and token counts per shard, kind and source; the packed stream reads it to split work evenly).

Deterministic: the same spec and inputs give byte-identical shards. Each shard is written under a temporary
name and renamed when complete, and ``spec.json`` records the spec and inputs, so rerunning a killed build
keeps the finished shards and writes only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import exit_on
from common.files import atomic_write, pattern_names, spec_holding
from common.options import HelpFormatter
from common.vocab import BOS_ID, EOS_ID
from sentences.errors import SentenceError
from sentences.formats import (
    ORIGINAL,
    SENTENCE_SHARD,
    SPEC_NAME,
    SentenceIndex,
    indexed_shards,
    one_tokenizer,
    read_build_record,
    read_report,
    tar_writer,
    token_report,
    write_lengths,
)
from sentences.kinds import KINDS, Builder, Sentence
from sentences.spec import MixSpec, SourceSpec, load_spec
from sentences.tokens import TokenSet, check_same_length, load_token_set


@dataclass
class Source:
    """A source of the spec, loaded: its builder and what was counted while loading and drawing."""

    spec: SourceSpec
    builder: Builder  # its ``notes`` count the loaded images it could not use
    epochs: float = 0.0
    sentences: int = 0
    tokens: int = 0


@dataclass
class Planned:
    """One sentence of the mixture before it is written: where it comes from and its images."""

    source: Source
    epoch: int
    index: int
    images: Sentence

    @property
    def key(self) -> str:
        return f"{self.source.spec.name}-{self.epoch:03d}-{self.index:08d}"


def load_sources(spec: MixSpec) -> tuple[list[Source], int, dict[str, dict], dict | None]:
    """Load every source's token sets and make its builder.

    Returns the sources, the tokens per image, per set of token shards the samples skipped by reason, and the
    tokenizer that made every set (None when their reports do not say; two different ones are an error).

    Shards used by several sources with the same variants (one set drawn by two `single` sources, or as `pairs`
    of two tasks) are loaded once and shared; a set read with other variants (`single`: the originals;
    `colorization`: originals and gray) is loaded again for them, originals and jsons included.
    """
    loaded: dict[tuple, tuple[TokenSet, Counter]] = {}

    def load(name: str, paths: list[str], variants: tuple[str, ...]) -> TokenSet:
        key = (name, tuple(paths), variants)
        if key not in loaded:
            skipped: Counter = Counter()
            loaded[key] = load_token_set(name, paths, variants, skipped), skipped
        return loaded[key][0]

    sources = []
    for i, src in enumerate(spec.sources):
        kind = KINDS[src.kind]
        images = load("image", src.shards, kind.variants)
        annotations = {task: load(task, paths, (ORIGINAL,)) for task, paths in src.annotations.items()}
        try:
            sources.append(Source(src, kind(images, annotations, src.options, Counter())))
        except SentenceError as exn:  # options that do not fit the data (categories: 9, a field): name the source,
            raise SentenceError(f"{spec.path}: sources[{i}] ({src.name})", str(exn)) from None  # not only a shard
    sets = [s for s, _ in loaded.values()]
    tokens_per_image = check_same_length(sets)
    tokenizer = one_tokenizer((s.shards[0], s.tokenizer) for s in sets)
    for i, src in enumerate(spec.sources):
        images = KINDS[src.kind].images_per_sentence(src.options, len(src.annotations))
        if images * tokens_per_image > spec.window:
            raise SentenceError(
                f"{spec.path}: sources[{i}] ({src.name}): sentences of {images} images x {tokens_per_image} tokens "
                f"exceed the window of {spec.window} tokens (at most {spec.window // tokens_per_image} images fit)"
            )
    # Per set of shards, however many variant sets read it: one damaged sample read for the originals and for the
    # gray pictures is one sample lost, counted once (a variant missing from a sample counts where it is missing).
    skipped: dict[str, dict] = {}
    for s, counts in loaded.values():
        label = f"{s.shards[0]} ({len(s.shards)} shards)"
        skipped[label] = dict(Counter(skipped.get(label, {})) | counts)
    skipped = {label: counts for label, counts in skipped.items() if counts}
    return sources, tokens_per_image, skipped, tokenizer


def _rng(seed: int, name: str, *stream: int) -> np.random.Generator:
    """Generator for one source and pass; keyed by the source's name so adding a source changes no other."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *stream])


def _plan_bytes(sentences: list) -> float:
    """Memory one pass of these sentences takes once planned: ~170 B a sentence and ~125 B an image reference
    (measured: ~300 B a single-image sentence, ~2.1 KB a 16-frame clip; review 59)."""
    return sum(170 + 125 * len(sentence) for sentence in sentences)


def _memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when lower (a Slurm job's --mem)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


def plan(spec: MixSpec, sources: list[Source], tokens_per_image: int) -> list[Planned]:
    """Every sentence of the mixture, in a seeded shuffled order. Held in memory, so a spec whose plan could not
    fit (epochs: 100000, or a total of tokens far past the sources) is refused before it grows to the OOM killer."""
    planned: list[Planned] = []
    plan_bytes = 0.0
    total_weight = sum(s.spec.weight or 0.0 for s in sources)
    for src in sources:
        name = src.spec.name
        first = src.builder.draw(_rng(spec.seed, name, 0))
        if not first:  # a source the spec names but that gives nothing is a mistake, not an empty success
            unused = "; ".join(f"{n} {reason}" for reason, n in src.builder.notes.items()) or "no images"
            raise SentenceError(spec.path, f"source {name!r} makes no sentences ({unused})")
        if spec.tokens is None:
            src.epochs = src.spec.epochs
        else:
            pass_tokens = sum(len(s) * tokens_per_image + 2 for s in first)
            src.epochs = src.spec.weight / total_weight * spec.tokens / pass_tokens
        plan_bytes += _plan_bytes(first) * src.epochs
        if plan_bytes > _memory_bytes():
            raise SentenceError(spec.path, f"source {name!r} asks for {src.epochs:.4g} passes of {len(first):,} "
                                f"sentences: the plan alone would take ~{plan_bytes / 1e9:.0f} GB, more than this "
                                f"machine's {_memory_bytes() / 1e9:.0f} GB; lower its epochs or weight (or the tokens), "
                                "or build the mixture in several ranges (docs/scaling.md)")
        planned_before = len(planned)
        for epoch in range(math.ceil(src.epochs)):
            sentences = first if epoch == 0 else src.builder.draw(_rng(spec.seed, name, epoch))
            keep = range(len(sentences))
            if src.epochs - epoch < 1:  # a fractional last pass: a random part of it
                count = round((src.epochs - epoch) * len(sentences))
                keep = np.sort(_rng(spec.seed, name, epoch, 1).choice(len(sentences), count, replace=False))
            planned += [Planned(src, epoch, int(i), sentences[i]) for i in keep]
        if len(planned) == planned_before:  # its share rounds to nothing: as much a mistake as no images
            raise SentenceError(spec.path, f"source {name!r} gets no sentences: {src.epochs:.4g} passes of "
                                f"{len(first)} sentences (raise its epochs or weight, or the tokens)")
    order = np.random.default_rng(spec.seed).permutation(len(planned))
    return [planned[i] for i in order]


def assemble(item: Planned) -> tuple[np.ndarray, dict]:
    """``[BOS, image tokens..., EOS]`` as uint16 and the sentence json (every id was checked on loading)."""
    tokens = np.concatenate(
        [[BOS_ID], *(images.tokens[variant][row] for images, variant, row in item.images), [EOS_ID]]
    ).astype(np.uint16)
    info = {
        "kind": item.source.spec.kind,
        "source": item.source.spec.name,
        "epoch": item.epoch,
        "images": [images.provenance(row, variant) for images, variant, row in item.images],
    }
    return tokens, info


def _fingerprint(spec: MixSpec) -> str:
    """Hash of the spec and the input shards: what decides the output bytes.

    An input counts by its path, its size and the fingerprint its `lvm.tokenize` report records (None for
    shards other tools made): re-tokenizing with another tokenizer keeps every size and changes every report.
    """
    inputs = sorted({p for s in spec.sources for p in [*s.shards, *(q for v in s.annotations.values() for q in v)]})
    payload = json.dumps({"spec": spec.to_json(), "inputs": [(p, os.path.getsize(p), _made_with(p)) for p in inputs]})
    return hashlib.sha256(payload.encode()).hexdigest()


def _made_with(shard: str) -> str | None:
    """The fingerprint in a token shard's report, or None without a readable one."""
    return read_report(token_report(shard)).get("fingerprint")


def _prepare_out(spec: MixSpec, out: Path) -> None:
    """Claim ``out`` for this spec, or check that an earlier run of the same spec and inputs owns it."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": _fingerprint(spec), "spec": spec.to_json()}
    marker, earlier = out / SPEC_NAME, read_build_record(out)
    if earlier is not None:
        if earlier.get("fingerprint") != record["fingerprint"]:
            raise SentenceError(
                f"{out}: holds a build of another spec or other inputs; remove it or choose another --out"
            )
    elif any(out.glob("sentences-*.tar")):
        raise SentenceError(f"{out}: holds sentence shards without {SPEC_NAME}; remove them or choose another --out")
    else:
        with atomic_write(marker, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")
    for tmp in out.glob("*.tmp"):  # left by a killed run
        tmp.unlink()


def write_shards(
    spec: MixSpec, planned: list[Planned], out: Path, tokens_per_image: int
) -> tuple[SentenceIndex, int]:
    """Write the planned sentences into shards, skipping shards a previous run completed, and the lengths of all
    sentences (``write_lengths``); returns the index of what the shards hold (shards and kinds) and how many
    shards were already done."""
    kinds = {s.kind: {"sentences": 0, "tokens": 0} for s in spec.sources}
    index, resumed = SentenceIndex(tokens_per_image, spec.seed, spec.window, kinds=kinds), 0
    lengths = np.array([len(item.images) for item in planned], dtype=np.int64) * tokens_per_image + 2
    earlier = _earlier_shards(out)
    per = spec.sentences_per_shard
    bar = tqdm(total=len(planned), desc="write", unit="sentence", dynamic_ncols=True)
    for k in range(math.ceil(len(planned) / per)):
        items = planned[k * per : (k + 1) * per]
        path = out / SENTENCE_SHARD.format(k)
        if path.exists():
            resumed += 1
        else:
            with tar_writer(path) as tar:
                for item in items:
                    tokens, info = assemble(item)
                    tar.write({"__key__": item.key, "tokens.npy": tokens, "json": info})
        shard_tokens = int(lengths[k * per : (k + 1) * per].sum())
        index.shards[path.name] = {"sentences": len(items), "tokens": shard_tokens, "bytes": path.stat().st_size}
        if path.name in earlier and earlier[path.name] != index.shards[path.name]:
            # a shard kept from a finished run that this plan would not write: another version's planning
            raise SentenceError(path, f"kept from the earlier run, whose index.json lists {earlier[path.name]}, but "
                                f"this build plans {index.shards[path.name]}: build into a new --out")
        bar.update(len(items))
    bar.close()
    write_lengths(out, lengths)
    for item, n in zip(planned, lengths.tolist()):
        kind = index.kinds[item.source.spec.kind]
        kind["sentences"] += 1
        kind["tokens"] += n
        item.source.sentences += 1
        item.source.tokens += n
    return index, resumed


def _earlier_shards(out: Path) -> dict[str, dict]:
    """The shards the ``index.json`` of an earlier, finished run in ``out`` lists ({} when there is none: a first
    run, a run killed before its end, or an index this version cannot read)."""
    try:
        shards = indexed_shards(str(out))
    except SentenceError:
        return {}
    return shards if isinstance(shards, dict) else {}


def _check_out_outside_inputs(spec: MixSpec, out: Path) -> None:
    """Refuse an `out` among the inputs: a rerun, the resume after a crash included, would read the sentence
    shards as token shards. Checked by name, before the first run writes anything: `out` inside a folder pattern,
    or a pattern that names the first shard `out` would hold or a folder above it (`tok/*` with `--out tok/mix`);
    and, for what names cannot show (links), by the shards found: one in `out` itself. Inputs in a folder below
    `out` are fine: a build writes only `out/sentences-*.tar`."""
    first_shard, resolved = out / SENTENCE_SHARD.format(0), out.resolve()
    for i, src in enumerate(spec.sources):
        folder = spec_holding(out, src.patterns)
        pattern = next((p for p in src.patterns if pattern_names(p, first_shard)), None)
        found = next((p for p in [*src.shards, *(q for v in src.annotations.values() for q in v)]
                      if Path(p).resolve().parent == resolved), None)
        where = f"inside the input folder {folder}" if folder else f"matched by {pattern}" if pattern else \
            f"where {found} lies"
        if folder or pattern or found:
            raise SentenceError(f"{out}: --out is {where} (sources[{i}], {src.name}); a rerun would read its sentence "
                                "shards as token shards: choose an --out outside the inputs")


def build(spec: MixSpec, out: str | Path) -> tuple[SentenceIndex, int]:
    """Run a whole build (resuming one that was interrupted); returns what ``index.json`` records and how many
    shards an earlier run had completed."""
    out = Path(out)
    _check_out_outside_inputs(spec, out)
    sources, tokens_per_image, skipped, tokenizer = load_sources(spec)
    planned = plan(spec, sources, tokens_per_image)
    _prepare_out(spec, out)  # only once the spec has proved buildable: a refused spec must not claim `out`
    index, resumed = write_shards(spec, planned, out, tokens_per_image)
    index.skipped = skipped
    for src in sources:
        index.sources[src.spec.name] = {
            "kind": src.spec.kind,
            "epochs": round(src.epochs, 4),
            "sentences": src.sentences,
            "tokens": src.tokens,
            "unused": dict(src.builder.notes),
        }
    index.tokenizer = tokenizer  # carried into the LVM checkpoint, which checks the tokenizer it is given
    index.write(out)
    return index, resumed


def _report(summary: SentenceIndex, resumed_shards: int, out: str, seconds: float) -> str:
    """The per-source and per-kind table, then the one-line summary."""
    lines = [f"{'source':<16}{'kind':<14}{'epochs':>8}{'sentences':>12}{'tokens':>15}  unused (images, groups or categories, by reason)"]
    for name, s in summary.sources.items():
        notes = "; ".join(f"{n} {r}" for r, n in s["unused"].items()) or "-"
        lines.append(f"{name:<16}{s['kind']:<14}{s['epochs']:>8.2f}{s['sentences']:>12,}{s['tokens']:>15,}  {notes}")
    for kind, k in summary.kinds.items():
        lines.append(f"{'[' + kind + ']':<30}{'':>8}{k['sentences']:>12,}{k['tokens']:>15,}")
    sentences = sum(k["sentences"] for k in summary.kinds.values())
    tokens = sum(k["tokens"] for k in summary.kinds.values())
    for label, counts in summary.skipped.items():
        lines.append(f"skipped in {label}: " + "; ".join(f"{n} {reason}" for reason, n in counts.items()))
    skipped = sum((Counter(counts) for counts in summary.skipped.values()), Counter())
    resumed = f" ({resumed_shards} already done)" if resumed_shards else ""
    lines.append(
        f"built {sentences:,} sentences ({tokens:,} tokens, {len(summary.kinds)} kinds) into "
        f"{len(summary.shards)} shards{resumed} in {out} in {seconds:.1f} s; skipped: "
        + (", ".join(f"{n:,} {reason}" for reason, n in skipped.items()) or "nothing")
    )
    return "\n".join(lines)


@exit_on
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentences.build", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--spec", required=True, help="mixing spec (YAML), see docs/sentences.md")
    parser.add_argument("--out", required=True, help="output folder for sentence shards and index.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    index, resumed = build(load_spec(args.spec), args.out)
    print(_report(index, resumed, args.out, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
