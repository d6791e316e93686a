"""The mixing spec: which token shards become which kind of sentences, and how much of each.

A YAML file (documented with a full example in docs/sentences.md)::

    seed: 0
    window: 4096               # model context: a sentence holds at most window // tokens_per_image images
    sentences_per_shard: 1000
    sources:
      - {name: laion, kind: single, shards: tokens/laion/, epochs: 1}
      - {name: k700, kind: video, shards: tokens/k700/, epochs: 2, strides: [4, 8]}

How much of a source goes into the mixture is given either per source as ``epochs`` (passes over it, each
freshly drawn; a fraction takes a random part of one more pass), or as a total ``tokens`` for the mixture
with a ``weight`` per source (its share of the tokens; its epochs follow from its size). Every problem is
reported as one line naming the field, before any data is read (except sentences too long for the window,
which needs the tokens per image: ``sentences.build`` checks it right after loading, before writing).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from common.files import ShardPatternError, expand_shards
from sentences.errors import SentenceError
from sentences.kinds import KINDS

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TOP = ("seed", "window", "sentences_per_shard", "tokens", "sources")
_SOURCE = {"name", "kind", "shards", "annotations", "epochs", "weight"}
_ADDED_LATER = {"starts": "random"}
"""Options added after builds were recorded, with the value that writes what builds before them wrote: left out of
the record at that value, so that such a build still resumes (its fingerprint holds every option)."""


@dataclass(frozen=True)
class SourceSpec:
    """One source of the mixture: token shards, the kind of sentence drawn from them, and how much."""

    name: str
    kind: str
    shards: list[str]
    annotations: dict[str, list[str]] = field(default_factory=dict)
    epochs: float | None = None  # passes over the source (epochs mode)
    weight: float | None = None  # share of the mixture's tokens (tokens mode)
    options: dict = field(default_factory=dict)  # the kind's options, defaults filled in
    patterns: list[str] = field(default_factory=list)  # shards and annotations as the spec names them (not hashed)


@dataclass(frozen=True)
class MixSpec:
    """A validated mixing spec; ``path`` is the YAML it came from, used in error messages."""

    path: str
    seed: int
    window: int
    sentences_per_shard: int
    tokens: int | None
    sources: list[SourceSpec]

    def to_json(self) -> dict:
        """Everything that determines the output, for the build's fingerprint and index."""
        record = {k: v for k, v in asdict(self).items() if k != "path"}
        for source in record["sources"]:
            del source["patterns"]  # the shards they name are recorded
            source["options"] = {k: v for k, v in source["options"].items() if (k, v) not in _ADDED_LATER.items()}
        return record


def _positive(value: object, where: str, kind: type = int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not 0 < value < math.inf:
        hint = ""
        if isinstance(value, str) and "e" in value.lower():
            try:
                float(value)
                hint = " (YAML reads 1e3 as text: write 1000 or 1.0e+3)"
            except ValueError:
                pass
        raise SentenceError(f"{where}: expected a positive {'number' if kind is float else 'integer'}, got {value!r}{hint}")
    return value


def _option(value: object, default: object, where: str) -> object:
    """An option checked against the type of its default (positive int, list of positive ints, string, or an
    optional string whose default None means "off")."""
    if default is None and value is None:
        return None
    if isinstance(default, int):
        return _positive(value, where)
    if isinstance(default, list):
        if not isinstance(value, list) or not value:
            raise SentenceError(f"{where}: expected a list of positive integers, got {value!r}")
        return [_positive(v, where) for v in value]
    if not isinstance(value, str) or not value:
        raise SentenceError(f"{where}: expected a string, got {value!r}")
    return value


def _shards(value: object, where: str) -> list[str]:
    if not isinstance(value, (str, list)) or not value:
        raise SentenceError(f"{where}: expected a folder, glob, brace pattern or list of them, got {value!r}")
    try:
        return expand_shards(value)
    except ShardPatternError as exn:
        raise SentenceError(f"{where}: {exn}") from None


def _source(raw: object, where: str, tokens_mode: bool) -> SourceSpec:
    if not isinstance(raw, dict):
        raise SentenceError(f"{where}: expected a mapping with name, kind and shards, got {raw!r}")
    for required in ("name", "kind", "shards"):
        if required not in raw:
            raise SentenceError(f"{where}.{required}: missing")
    name, kind = raw["name"], raw["kind"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SentenceError(f"{where}.name: expected letters, digits, '-' or '_', got {name!r}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise SentenceError(f"{where}.kind: unknown kind {kind!r} (one of: {', '.join(KINDS)})")
    builder = KINDS[kind]
    for key in raw:
        if key not in _SOURCE and key not in builder.options:
            allowed = ", ".join(sorted(_SOURCE | set(builder.options)))
            raise SentenceError(f"{where}.{key}: unknown field for kind {kind} (allowed: {allowed})")
    options = {k: _option(raw.get(k, d), d, f"{where}.{k}") for k, d in builder.options.items()}
    for option, allowed in builder.choices.items():
        if options[option] not in allowed:
            raise SentenceError(f"{where}.{option}: expected one of {', '.join(allowed)}, got {options[option]!r}")
    if options.get("frames", 2) < 2:
        raise SentenceError(f"{where}.frames: a clip needs at least 2 frames, got {options['frames']}")

    annotations = raw.get("annotations", {})
    if not isinstance(annotations, dict):
        raise SentenceError(f"{where}.annotations: expected a mapping task -> shards, got {annotations!r}")
    low, high = builder.annotations
    if not low <= len(annotations) <= (high if high is not None else len(annotations)):
        count = f"exactly {low}" if low == high else f"at least {low}" if len(annotations) < low else f"at most {high}"
        raise SentenceError(f"{where}.annotations: kind {kind} takes {count} annotation sets, got {len(annotations)}")
    for task in annotations:
        if not isinstance(task, str) or not _NAME.fullmatch(task) or task == "image":
            raise SentenceError(f"{where}.annotations: bad task name {task!r} (letters, digits, '-', '_'; not 'image')")

    if tokens_mode:
        if "epochs" in raw:
            raise SentenceError(f"{where}.epochs: not allowed with a total 'tokens' (give a weight instead)")
        weight, epochs = float(_positive(raw.get("weight", 1.0), f"{where}.weight", float)), None
    else:
        if "weight" in raw:
            raise SentenceError(f"{where}.weight: needs a total 'tokens' for the mixture (or give epochs instead)")
        weight, epochs = None, float(_positive(raw.get("epochs", 1), f"{where}.epochs", float))
    if options.get("starts") == "every" and epochs != 1:
        raise SentenceError(f"{where}.starts: 'every' gives every clip once, so it takes epochs: 1 (other passes, or a "
                            f"weight, would repeat or cut the set), got {'a weight' if epochs is None else f'epochs: {epochs:g}'}")
    return SourceSpec(
        name=name,
        kind=kind,
        shards=_shards(raw["shards"], f"{where}.shards"),
        annotations={t: _shards(p, f"{where}.annotations.{t}") for t, p in annotations.items()},
        epochs=epochs,
        weight=weight,
        options=options,
        patterns=[p for value in (raw["shards"], *annotations.values()) for p in ([value] if isinstance(value, str) else value)],
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last without a word). Merge keys
    (`<<: *video`) are no keys of their own: a key they bring may be given again, which overrides it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise SentenceError(f"line {node.start_mark.line + 1}: {twice!r} given twice in one mapping")
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> MixSpec:
    """Parse and validate a mixing spec; raises SentenceError(``<path>: <field>: <problem>``)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as exn:
        raise SentenceError(f"{path}: cannot read ({exn.strerror})") from None
    except yaml.YAMLError as exn:
        raise SentenceError(f"{path}: not valid YAML ({str(exn).splitlines()[0]})") from None
    except UnicodeDecodeError as exn:  # a comment saved in Latin-1
        raise SentenceError(f"{path}: not UTF-8 text (byte {exn.start}: {exn.reason})") from None
    except SentenceError as exn:
        raise SentenceError(f"{path}: {exn}") from None
    try:
        return _validate(raw, path)
    except SentenceError as exn:
        raise SentenceError(f"{path}: {exn}") from None


def _validate(raw: object, path: str) -> MixSpec:
    if not isinstance(raw, dict):
        raise SentenceError("expected a mapping with 'sources'")
    for key in raw:
        if key not in _TOP:
            raise SentenceError(f"{key}: unknown field (allowed: {', '.join(_TOP)})")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise SentenceError("sources: expected a non-empty list of sources")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SentenceError(f"seed: expected a non-negative integer, got {seed!r}")
    tokens = raw.get("tokens")
    if tokens is not None:
        tokens = _positive(tokens, "tokens")
    specs = [_source(s, f"sources[{i}]", tokens is not None) for i, s in enumerate(sources)]
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SentenceError(f"sources[{i}].name: {name!r} used twice")
    return MixSpec(
        path=path,
        seed=seed,
        window=_positive(raw.get("window", 4096), "window"),
        sentences_per_shard=_positive(raw.get("sentences_per_shard", 1000), "sentences_per_shard"),
        tokens=tokens,
        sources=specs,
    )
