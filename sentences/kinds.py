"""One builder per kind of visual sentence.

A builder is made once per source (grouping videos, pairing sets by key, pooling categories) and then draws one
pass over the source per call to ``draw`` with the pass's random generator, so every epoch gets new random
starts, new pairings and new task orders. A sentence is a tuple of image references; ``sentences.build`` turns
it into ``[BOS, image tokens..., EOS]``. docs/sentences.md shows each kind's layout.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import PurePosixPath
from typing import ClassVar

import numpy as np

from common.files import natural_key
from sentences.errors import SentenceError
from sentences.formats import ORIGINAL
from sentences.tokens import TokenSet

Ref = tuple[TokenSet, str, int]
"""One image of a sentence: the set it comes from, the token variant, the row in the set."""
Sentence = tuple[Ref, ...]


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    """``order`` cut into runs of ``size``; the last run may be shorter, so no image is left out of a pass."""
    return [order[i : i + size] for i in range(0, len(order), size)]


def _where(images: TokenSet, row: int) -> str:
    """`<shard>: sample '<key>'`: where image ``row`` of a set came from, for errors about it."""
    return f"{images.shards[images.shard_of[row]]}: sample '{images.keys[row]}'"


def _group_ids(images: TokenSet, rows: list[int] | np.ndarray, field: str | None) -> np.ndarray | None:
    """The group of each of these image rows (the value of its json ``field``), as ints; None when ``field`` is None."""
    if field is None:
        return None
    missing = [int(row) for row in rows if field not in images.meta[row]]
    if missing:
        raise SentenceError(f"{_where(images, missing[0])}: no '{field}' in its json to group by "
                            f"({len(missing)} images of the set lack it)")
    values = [str(images.meta[row][field]) for row in rows]
    names = {name: i for i, name in enumerate(dict.fromkeys(values))}
    return np.array([names[value] for value in values], dtype=np.int64)


def _group_chunks(order: np.ndarray, groups: np.ndarray | None, size: int) -> list[np.ndarray]:
    """Like ``_chunks``, but every run holds rows of one group (``groups[row]``), groups taken in the order
    their first row comes in ``order``; without groups, plain ``_chunks``."""
    if groups is None:
        return _chunks(order, size)
    # One stable sort by each group's first place, not a scan of every row per group: that was images x groups
    # (a minute per pass at 1M images in 20k folders, days at LAION size).
    in_order = groups[order]
    present, first = np.unique(in_order, return_index=True)
    rank = np.empty(int(groups.max()) + 1, dtype=np.int64)
    rank[present[np.argsort(first)]] = np.arange(len(present))
    by_group = np.argsort(rank[in_order], kind="stable")
    starts = np.flatnonzero(np.diff(rank[in_order][by_group])) + 1
    return [run for rows in np.split(order[by_group], starts) for run in _chunks(rows, size)]


class Builder:
    """Draws the sentences of one source. Subclasses set the class attributes and ``draw``.

    ``options`` lists the kind's options with their defaults (the spec may set any of them); ``variants`` are the
    token variants every source image must have; ``annotations`` is the allowed number of annotation sets.
    """

    options: ClassVar[dict[str, object]] = {}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # the values a text option may take
    variants: ClassVar[tuple[str, ...]] = (ORIGINAL,)
    annotations: ClassVar[tuple[int, int | None]] = (0, 0)

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        """``notes`` counts, by reason, the images this source cannot use (reported in the build summary)."""
        self.images = images
        self.sets = {"image": images, **annotations}
        self.opt = {**self.options, **options}
        self.notes = notes

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        """The most images one sentence can hold with these options (checked against the window)."""
        raise NotImplementedError

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        """The sentences of one pass over the source."""
        raise NotImplementedError


class Single(Builder):
    """``[image]``: every image on its own."""

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return 1

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        return [((self.images, ORIGINAL, int(row)),) for row in rng.permutation(len(self.images))]


class Video(Builder):
    """``[f_s, f_s+k, f_s+2k, ...]``: ``frames`` frames of one video at stride ``k``, random start ``s``.

    Frames are grouped by the json field ``group_by`` and ordered by ``order_by``; the stride counts stored
    frames (the tokenize step may already have kept every n-th frame). Each pass draws one clip per video and per
    stride in ``strides``. As in the release, a clip always has ``frames`` frames: a video too short for them at a
    stride gets the largest stride that fits, and one with fewer than ``frames`` frames gives no clip (counted).
    """

    options = {"frames": 16, "strides": [8], "group_by": "video", "order_by": "frame", "starts": "random"}
    choices = {"starts": ("random", "every")}

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        super().__init__(images, annotations, options, notes)
        group_by, order_by = self.opt["group_by"], self.opt["order_by"]
        groups: dict[str, list[tuple[object, int]]] = defaultdict(list)
        for row, meta in enumerate(images.meta):
            if group_by not in meta or order_by not in meta:
                notes[f"images without '{group_by}' and '{order_by}' in their json"] += 1
                continue
            if not self.usable(row):
                continue
            order = meta[order_by]  # names in natural order: frame2 before frame10
            groups[str(meta[group_by])].append((natural_key(order) if isinstance(order, str) else order, row))
        self.groups = []
        for members in groups.values():
            try:
                members.sort()
                self.groups.append(np.array([row for _, row in members]))
            except TypeError:  # values that do not compare (a number and a null): name one that differs from the first
                kinds = [str if isinstance(order, tuple) else type(order) if not isinstance(order, (int, float)) else float
                         for order, _ in members]
                row = next((row for (_, row), kind in zip(members, kinds) if kind != kinds[0]), members[-1][1])  # or
                # values of one type that has no order at all (a json object)
                raise SentenceError(f"{_where(images, row)}: json field '{order_by}' is "
                                    f"{images.meta[row][order_by]!r}, which cannot order it among its video's frames "
                                    f"(such as {images.meta[members[0][1]][order_by]!r})") from None
            twice = next(((a, b) for (x, a), (y, b) in zip(members, members[1:]) if x == y), None)
            if twice:  # the same video tokenized twice and listed twice: its clips would step through both copies
                raise SentenceError(f"{_where(images, twice[1])}: the same {group_by} and {order_by} as "
                                    f"{_where(images, twice[0])} ({images.meta[twice[1]][group_by]!r}, "
                                    f"{images.meta[twice[1]][order_by]!r}): is a video listed twice?")
        if short := sum(len(rows) < self.opt["frames"] for rows in self.groups):
            notes[f"groups with fewer than {self.opt['frames']} frames"] += short

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return options["frames"]

    def usable(self, row: int) -> bool:
        """Whether image ``row`` may be a frame (every image of a video may)."""
        return True

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        return [tuple((self.images, ORIGINAL, int(row)) for row in clip) for clip in self.clips(rng)]

    def clips(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The rows of each clip of one pass, group by group: one clip per stride from a random start, or with
        ``starts: every`` every clip once, from every start, at each stride of ``strides`` (capped at what fits):
        a held-out evaluation set whose windows are all distinct, none drawn twice."""
        clips, n = [], self.opt["frames"]
        for rows in self.groups:
            if len(rows) < n:
                continue
            fit = (len(rows) - 1) // (n - 1)
            if self.opt["starts"] == "every":
                for stride in dict.fromkeys(min(stride, fit) for stride in self.opt["strides"]):
                    clips += [rows[start : start + (n - 1) * stride + 1 : stride]
                              for start in range(len(rows) - (n - 1) * stride)]
                continue
            for stride in self.strides(rng, fit):
                start = int(rng.integers(0, len(rows) - (n - 1) * stride))
                clips.append(rows[start : start + (n - 1) * stride + 1 : stride])
        return clips

    def strides(self, rng: np.random.Generator, fit: int) -> list[int]:
        """The strides of one group's clips in one pass: every stride of the spec, each capped at ``fit``, the
        largest stride at which the group holds ``frames`` frames."""
        return [min(stride, fit) for stride in self.opt["strides"]]


class Sequence(Video):
    """``[f_s, f_s+k, ...]``: 16 frames of an image sequence (a frame folder), one clip per sequence and pass at a
    stride ``k`` drawn from those of ``strides`` at which the sequence holds 16 frames (the release's [1, 4] for
    frame folders).

    ``lvm.tokenize --frame-folders`` records each image's folder as ``video`` and its place in the folder as ``frame``.
    """

    options = {"frames": 16, "strides": [1, 2, 3, 4], "group_by": "video", "order_by": "frame", "starts": "random"}

    def strides(self, rng: np.random.Generator, fit: int) -> list[int]:
        fitting = [stride for stride in self.opt["strides"] if stride <= fit] or [fit]
        return [int(rng.choice(fitting))]


class MultiView(Sequence):
    """``[v1, ..., vk, a1, ..., ak]`` x ``shots``: views of one object or scene, grouped and drawn like the frames of a
    sequence (one clip per object and pass, at a stride drawn from ``strides``), each shot followed by the
    annotation of each of its views when an annotation set (masks, depth) is given, ``shots`` objects per sentence.

    That is the release's CO3D layout (4 views then their 4 masks or depth maps, 4 shots). A view's annotation is
    the image of the annotation set with the same file name (any suffix) at the view's path or in a folder beside
    the view's folder (`_annotation_of_each_view`). Views without one are not used (counted).
    """

    options = {"frames": 16, "strides": [1], "group_by": "folder", "order_by": "path", "shots": 1, "starts": "random"}
    annotations = (0, 1)

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        self.partner: dict[int, int] | None = None
        if annotations:
            (task, found), = annotations.items()
            self.annotated = found
            self.partner = _annotation_of_each_view(images, found)
            fields = [options.get(name, self.options[name]) for name in ("group_by", "order_by")]
            # views without those fields are counted once, as such, by Video
            if missing := sum(row not in self.partner and all(f in meta for f in fields)
                              for row, meta in enumerate(images.meta)):
                notes[f"views without a {task} image beside them"] += missing
        super().__init__(images, annotations, options, notes)

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return options["frames"] * options["shots"] * (1 + n_annotations)

    def usable(self, row: int) -> bool:
        return self.partner is None or row in self.partner

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        clips = self.clips(rng)
        sentences = []
        for chunk in _chunks(rng.permutation(len(clips)), self.opt["shots"]):
            sentence: list[Ref] = []
            for clip in (clips[i] for i in chunk):
                sentence += [(self.images, ORIGINAL, int(row)) for row in clip]
                if self.partner is not None:
                    sentence += [(self.annotated, ORIGINAL, self.partner[int(row)]) for row in clip]
            sentences.append(tuple(sentence))
        return sentences


class Pairs(Builder):
    """``[x1, y1, x2, y2, ...]``: an image then its annotation for one task, ``pairs`` pairs, paired by key.

    With ``group_by`` (a json field such as ``folder`` or ``video``) the pairs of a sentence come from one group,
    so the examples show the same scene or object as the last pair: what the answer looks like can then be read
    from the examples, not only the task. Without it, pairs are drawn from the whole set.
    """

    options = {"pairs": 8, "group_by": None}
    annotations = (1, 1)

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        super().__init__(images, annotations, options, notes)
        self.rows = _join(list(self.sets.values()), notes)
        self.groups = _group_ids(images, self.rows[:, 0], self.opt["group_by"])

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return 2 * options["pairs"]

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        sets = list(self.sets.values())
        return [
            tuple((sets[j], ORIGINAL, int(self.rows[i, j])) for i in chunk for j in range(len(sets)))
            for chunk in _group_chunks(rng.permutation(len(self.rows)), self.groups, self.opt["pairs"])
        ]


class MultiTask(Builder):
    """``[a_t1, a_t2, ..., b_t1, b_t2, ...]``: ``shots`` images, each followed by its other annotations.

    The image and its annotation sets (paired by key) are the tasks; their order is permuted per sentence and
    kept across the shots of that sentence, so the sentence reads as an analogy: the first shots show the
    mapping, the last asks for it.
    """

    options = {"shots": 3}
    annotations = (1, None)

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        super().__init__(images, annotations, options, notes)
        self.rows = _join(list(self.sets.values()), notes)

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return options["shots"] * (1 + n_annotations)

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        sets = list(self.sets.values())
        sentences = []
        for chunk in _chunks(rng.permutation(len(self.rows)), self.opt["shots"]):
            tasks = rng.permutation(len(sets))
            sentences.append(tuple((sets[j], ORIGINAL, int(self.rows[i, j])) for i in chunk for j in tasks))
        return sentences


class Colorization(Builder):
    """``[gray1, color1, gray2, color2, ...]``: ``pairs`` images, each as its gray variant then itself.

    The gray variant is made from pixels (luma 0.2989 R + 0.587 G + 0.114 B) and tokenized by the tokenize
    step, stored as ``<key>.gray.tokens.npy``. ``group_by`` as for ``Pairs``.
    """

    options = {"pairs": 8, "group_by": None}
    derived: ClassVar[str] = "gray"
    variants = (ORIGINAL, "gray")

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        super().__init__(images, annotations, options, notes)
        self.groups = _group_ids(images, range(len(images)), self.opt["group_by"])

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return 2 * options["pairs"]

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        pairs = _group_chunks(rng.permutation(len(self.images)), self.groups, self.opt["pairs"])
        variants = (self.derived, ORIGINAL)
        return [tuple((self.images, v, int(row)) for row in chunk for v in variants) for chunk in pairs]


class Inpainting(Colorization):
    """``[masked1, image1, masked2, image2, ...]``: like colorization with the masked variant.

    The masked variant (a square hole or dropped patches, parameters in the image's json) is made from pixels
    and tokenized by the tokenize step, stored as ``<key>.masked.tokens.npy``.
    """

    derived = "masked"
    variants = (ORIGINAL, "masked")


class Category(Builder):
    """``[c1 x images, c2 x images, ...]``: ``images`` images of each of ``categories`` different categories.

    The category is the json field ``field`` (``folder`` for images from class folders, or a label field kept
    from the source json). Each pass shuffles every category and picks categories with probability proportional
    to the images they have left, so all categories run out at about the same time; the images of categories
    left without enough partners at the end of a pass are not used in that pass.
    """

    options = {"field": "folder", "categories": 4, "images": 4}

    def __init__(self, images: TokenSet, annotations: dict[str, TokenSet], options: dict, notes: Counter) -> None:
        super().__init__(images, annotations, options, notes)
        pools: dict[str, list[int]] = defaultdict(list)
        for row, meta in enumerate(images.meta):
            if self.opt["field"] in meta:
                pools[str(meta[self.opt["field"]])].append(row)
            else:
                notes[f"images without '{self.opt['field']}' in their json"] += 1
        self.pools = [np.array(rows) for rows in pools.values() if len(rows) >= self.opt["images"]]
        if small := len(pools) - len(self.pools):
            notes[f"categories with fewer than {self.opt['images']} images"] += small
        if len(self.pools) < self.opt["categories"]:
            raise SentenceError(
                f"{images.shards[0]}: {len(self.pools)} categories ('{self.opt['field']}') have at least "
                f"{self.opt['images']} images, {self.opt['categories']} needed per sentence"
            )

    @classmethod
    def images_per_sentence(cls, options: dict, n_annotations: int) -> int:
        return options["categories"] * options["images"]

    def draw(self, rng: np.random.Generator) -> list[Sentence]:
        k, n = self.opt["images"], self.opt["categories"]
        pools = [rng.permutation(rows) for rows in self.pools]
        left = np.array([len(rows) for rows in pools])
        sentences = []
        while len(eligible := np.flatnonzero(left >= k)) >= n:
            weights = left[eligible] / left[eligible].sum()
            sentence = []
            for c in rng.choice(eligible, size=n, replace=False, p=weights):
                taken = pools[c][len(pools[c]) - left[c] :][:k]
                left[c] -= k
                sentence += [(self.images, ORIGINAL, int(row)) for row in taken]
            sentences.append(tuple(sentence))
        self.notes["images left over at the end of a pass (summed over passes)"] += int(left.sum())
        return sentences


KINDS: dict[str, type[Builder]] = {
    "single": Single,
    "video": Video,
    "sequence": Sequence,
    "multiview": MultiView,
    "pairs": Pairs,
    "multitask": MultiTask,
    "colorization": Colorization,
    "inpainting": Inpainting,
    "category": Category,
}


def _folder_and_name(meta: dict, up: int) -> tuple[str, str] | None:
    """(the folder ``up`` levels above an image's file, its file name up to the first dot) from its json ``path``;
    None without one. Up to the first dot, as webdataset keys are: CO3D's depth maps are ``frame001.jpg.geometric.png``."""
    path = meta.get("path")
    if not isinstance(path, str):
        return None
    path = PurePosixPath(path)
    return str(path.parents[up - 1]) if len(path.parents) >= up else "", path.name.split(".", 1)[0]


def _annotation_of_each_view(views: TokenSet, found: TokenSet) -> dict[int, int]:
    """{view row: annotation row}: the annotation image at the view's own path (``teddy_42/frame001.jpg`` ->
    ``teddy_42/frame001.png``: views stored flat per object, and ``lvm.annotate``'s output of them) if the sets
    pair that way at all, else the one of the same name in a folder beside the view's (``teddy_42/images/frame001.jpg``
    -> ``teddy_42/masks/frame001.png``, CO3D's layout). One rule for the whole set: in the flat layout the folder
    beside a view is another object's. Two annotation images that could both be a view's are an error, not a guess."""
    for up in (1, 2):
        candidates: dict[tuple[str, str], list[int]] = {}
        for row, meta in enumerate(found.meta):
            if (key := _folder_and_name(meta, up)) is not None:
                candidates.setdefault(key, []).append(row)
        partner: dict[int, int] = {}
        for row, meta in enumerate(views.meta):
            if (rows := candidates.get(_folder_and_name(meta, up))) is None:
                continue
            if len(rows) > 1:
                first, second = (found.meta[r]["path"] for r in rows[:2])
                raise SentenceError(
                    f"{views.shards[views.shard_of[row]]}: view '{meta['path']}' has two {found.name} images, "
                    f"'{first}' and '{second}'; give each view its annotation at the same path, or in a folder "
                    "beside the view's with one folder of views per object (CO3D's layout)"
                )
            partner[row] = rows[0]
        if partner:
            return partner
    return {}


def _join(sets: list[TokenSet], notes: Counter) -> np.ndarray:
    """Rows ``[n, len(sets)]`` of the keys found in every set (the first set is the source images)."""
    lookups = [s.rows_by_key() for s in sets]
    joined = [[lk[key] for lk in lookups] for key in sets[0].keys if all(key in lk for lk in lookups)]
    for s, lookup in zip(sets, lookups):
        if unpaired := len(lookup) - len(joined):
            notes[f"{s.name} samples without a partner in every set"] += unpaired
    if not joined:
        names = ", ".join(f"{s.name} ({s.shards[0]})" for s in sets)
        raise SentenceError(f"{sets[0].shards[0]}: no key is shared by all of {names}")
    return np.array(joined, dtype=np.int64)
