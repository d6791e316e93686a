"""The training stream: sentence shards packed into windows of ``seq_len + 1`` tokens, split over ranks and workers.

How an epoch is laid out (all of it follows from ``seed`` and the epoch, nothing from timing):

1. The shard list is shuffled with ``(seed, epoch)``. Its sentences, in that order, form one token stream whose
   length is known from ``index.json`` (written by ``sentences.build``; shards from other tools are counted by
   reading them once).
2. The stream is cut into ``readers = world_size x num_workers`` equal spans of ``batches x batch_size x
   (seq_len + 1)`` tokens, one per (rank, worker), so every reader yields the same number of batches and DDP
   ranks never wait on each other. Less than one global batch is left out at the end of the epoch. A sentence
   crossing a span boundary is split between the two readers; each reads only the shards its span touches.
3. Each reader shuffles its sentences in a buffer seeded by ``(seed, epoch, reader)``, packs them back to back
   and cuts windows of ``seq_len + 1`` tokens: ``input_ids = window[:-1]``, ``labels = window[1:]``. As in the
   release, nothing is masked at sentence boundaries (EOS predicts the next BOS); ``doc_ids`` lets the model
   mask attention across sentences if it wants.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from common.files import expand_shards
from sentences.errors import SentenceError
from sentences.formats import (
    ANOTHER_BUILD,
    LENGTHS_NAME,
    check_folders_whole,
    has_lengths,
    indexed_lengths,
    indexed_shards,
    read_sentences,
)

SHUFFLE_BUFFER = 4096
"""Sentences a reader holds to shuffle (at most ~32 MB at 16 images of 256 tokens); the build already shuffled
the mixture across shards, so this only has to break up the order within a reader's shards."""


def shard_tokens(paths: list[str]) -> np.ndarray:
    """Tokens in each shard: from the ``index.json`` beside it when it lists the shard, otherwise by reading the
    shard. A shard whose size is not the one listed is refused: it was damaged (a copy cut short) or changed
    since ``sentences.build`` wrote it, and training on what is left would lose sentences silently."""
    indexes: dict[str, dict] = {}
    counts = []
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in indexes:
            indexes[folder] = indexed_shards(folder)
        entry = indexes[folder].get(os.path.basename(path))
        if isinstance(entry, dict) and "tokens" in entry and "bytes" in entry:
            if (size := os.path.getsize(path)) != entry["bytes"]:
                raise SentenceError(
                    path, f"{size:,} bytes, but index.json lists {entry['bytes']:,}: damaged or changed since "
                    "sentences.build wrote it (rebuild it, or remove index.json to take the shards as they are)"
                )
            counts.append(int(entry["tokens"]))
        else:
            stat = os.stat(path)
            counts.append(_tokens_read(path, stat.st_size, stat.st_mtime_ns))
    return np.array(counts, dtype=np.int64)


@functools.cache
def _tokens_read(path: str, size: int, mtime_ns: int) -> int:
    """Tokens in a shard without an index, read in full once for the file as it is (its size and modification
    time): a training run asks for them several times (the resume checks, the stream of each epoch). Unbounded
    (~100 B a shard): a bounded LRU scanned in shard order missed every time past its size, re-reading them all."""
    return sum(len(sentence.tokens) for sentence in read_sentences(path))


class PackedStream(IterableDataset):
    """Sentence shards as ready batches of packed windows; see the module docstring for the epoch layout.

    Use it with ``DataLoader(stream, batch_size=None, num_workers=W)``. Each item is a dict of LongTensors
    ``input_ids`` and ``labels`` [batch_size, seq_len] (plus ``doc_ids``, equal within one sentence and
    counting from 0 in each row, when ``doc_ids=True``).

    Epochs: call ``set_epoch(e)`` before iterating epoch ``e`` (each iteration yields one epoch; the DataLoader
    must not use ``persistent_workers``, which would keep workers with a stale epoch). Every (rank, worker)
    yields ``batches_per_epoch(W)`` batches.

    Exact resume: the consumer counts the batches it has taken from this rank's DataLoader in the current epoch
    (``n``) and saves ``{"epoch": e, "batches_consumed": n}``; after ``load_state_dict`` the next iteration
    yields batch ``n`` of epoch ``e`` first, then the same batches in the same order as the uninterrupted run.
    The DataLoader hands batches out round-robin (batch ``i`` from worker ``i % W``), so worker ``w`` takes the
    part of worker ``(w + n) % W`` and starts after the batches that part already produced. It finds that place
    from the sentence lengths alone (``lengths.npy``, written by ``sentences.build``) and then reads only the
    shards holding sentences still to come; without them it re-reads the batches already produced to skip them.
    Batches prefetched but not consumed are simply produced again. This needs the same shards, seed, ``world_size`` and ``num_workers`` as
    the run that saved the state.
    """

    def __init__(
        self,
        shards: str | list[str],
        seq_len: int = 4096,
        batch_size: int = 1,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        doc_ids: bool = False,
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise SentenceError(f"{shards}: seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.shards = expand_shards(shards)
        check_folders_whole(shards, self.shards)
        self.tokens = shard_tokens(self.shards)
        self.seq_len, self.batch_size, self.seed, self.doc_ids = seq_len, batch_size, seed, doc_ids
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batches_consumed = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.batches_consumed = epoch, 0

    def state_dict(self) -> dict:
        """Where this rank's stream stands, as checkpoints carry it: the pass and the batches it has given in it."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume after ``state["batches_consumed"]`` batches of ``state["epoch"]`` on this rank."""
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])

    def _rank_world(self) -> tuple[int, int]:
        """Rank and world size: as given, else from torch.distributed when it is initialised, else 0 and 1."""
        initialised = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if initialised else 0)
        world = self.world_size if self.world_size is not None else (dist.get_world_size() if initialised else 1)
        if not 0 <= rank < world:
            raise SentenceError(f"{self.shards[0]}: rank {rank} outside world size {world}")
        return rank, world

    def batches_per_epoch(self, num_workers: int = 0) -> int:
        """Batches each rank's DataLoader yields per epoch with ``num_workers`` workers (at least one per worker,
        else a SentenceError: call it in the main process to hear of that before any worker starts)."""
        _, world = self._rank_world()
        return self._batches_per_reader(world * max(1, num_workers)) * max(1, num_workers)

    def _batches_per_reader(self, readers: int) -> int:
        batches = int(self.tokens.sum()) // (readers * self.batch_size * (self.seq_len + 1))
        if batches == 0:
            raise SentenceError(
                f"{self.shards[0]}: {int(self.tokens.sum())} tokens in {len(self.shards)} shards cannot give one batch "
                f"of {self.batch_size} x {self.seq_len + 1} tokens to each of {readers} readers (ranks x workers)"
            )
        return batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumed = self.batches_consumed
        part = (worker + consumed) % workers  # the part whose next batch is this worker's turn in the round-robin
        reader, readers = rank * workers + part, world * workers
        batch_tokens = self.batch_size * (self.seq_len + 1)
        span = self._batches_per_reader(readers) * batch_tokens
        skip = max(0, -(-(consumed - part) // workers))  # batches i < consumed with i % workers == part
        if skip >= span // batch_tokens:  # the epoch was over when the position was saved: nothing to re-read
            return
        start, end = reader * span, (reader + 1) * span
        shards = self._span_shards(start, end)
        rng = np.random.default_rng([self.seed, self.epoch, reader])
        if skip and has_lengths([self.shards[shard] for shard, _ in shards]):
            shuffled, skip = self._resumed(shards, start, end, skip * batch_tokens, rng), 0
        else:  # from the start of the span; a resume without the sentence lengths re-reads what it skips
            shuffled = _shuffle(itertools.chain.from_iterable(self._pieces(*shard, start, end) for shard in shards), rng)
        for i, (tokens, docs) in enumerate(_pack(shuffled, batch_tokens, self.doc_ids)):
            if i >= skip:
                yield self._batch(tokens, docs)

    def _span_shards(self, start: int, end: int) -> list[tuple[int, int]]:
        """The shards holding tokens ``start`` to ``end`` of this epoch's stream, in stream order, each as (its
        number in ``self.shards``, the stream offset of its first token)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        offsets = np.concatenate([[0], np.cumsum(self.tokens[order])])
        return [
            (int(shard), int(first))
            for shard, first, last in zip(order, offsets[:-1], offsets[1:])
            if last > start and first < end
        ]

    def _pieces(self, shard: int, first: int, start: int, end: int) -> Iterator[np.ndarray]:
        """The sentences of one shard (its first token at stream offset ``first``) that lie between stream offsets
        ``start`` and ``end``, cut at those ends."""
        position = first
        for _, tokens, _ in read_sentences(self.shards[shard]):
            begin, position = position, position + len(tokens)
            if position > start:
                yield tokens[max(start - begin, 0) : min(end, position) - begin]
            if position >= end:
                return
        if position != first + self.tokens[shard]:
            raise SentenceError(
                f"{self.shards[shard]}: holds {position - first} tokens, expected {self.tokens[shard]} "
                "(index.json out of date?)"
            )

    def _piece_lengths(self, shard: int, first: int, start: int, end: int) -> np.ndarray:
        """The lengths of what ``_pieces`` yields, from the sentence lengths, without reading the shard's tokens."""
        lengths = indexed_lengths(self.shards[shard])
        ends = first + np.cumsum(lengths)
        begins = ends - lengths
        inside = (ends > start) & (begins < end)
        return np.minimum(ends[inside], end) - np.maximum(begins[inside], start)

    def _resumed(
        self, shards: list[tuple[int, int]], start: int, end: int, consumed: int, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        """What ``_shuffle`` over the span's pieces yields after its first ``consumed`` tokens, without re-reading
        them: where the shuffle stands is worked out from the pieces' lengths (``_place``), and only the shards
        holding pieces still to come are read."""
        counts: list[int] = []  # pieces in each shard, as far as _place asked for them

        def lengths() -> Iterator[np.ndarray]:
            for shard in shards:
                counts.append(len(cut := self._piece_lengths(*shard, start, end)))
                yield cut

        place = _place(lengths(), rng, consumed)
        wanted = {place.piece, *place.held}
        found: dict[int, np.ndarray] = {}
        later: Iterator[np.ndarray] = iter(())
        pieces = self._numbered_pieces(shards, counts, start, end, wanted, place.next_piece)
        for number, piece in pieces:
            if place.next_piece is not None and number >= place.next_piece:
                later = itertools.chain([piece], (piece for _, piece in pieces))
                break
            found[number] = piece
        yield found[place.piece][place.offset :]  # never empty: the place lies inside the piece
        if place.next_piece is None:  # the shuffle was draining its buffer
            yield from (found[number] for number in place.held)
        else:
            yield from _shuffle(later, rng, [found[number] for number in place.held])

    def _numbered_pieces(
        self, shards: list[tuple[int, int]], counts: list[int], start: int, end: int, wanted: set[int],
        after: int | None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The span's pieces numbered in order, only those in ``wanted`` or from ``after`` on (None: none); shards
        before ``after`` holding none of them (``counts`` gives their piece counts) are not read."""
        marks = np.array(sorted(wanted), dtype=np.int64)
        number = 0
        for k, (shard, offset) in enumerate(shards):
            base, stop = number, None  # stop: past the last piece wanted from a shard read only for some
            if k < len(counts) and (after is None or base + counts[k] <= after):
                inside = marks[(marks >= base) & (marks < base + counts[k])]
                if not len(inside):
                    number += counts[k]
                    continue
                stop = int(inside[-1]) + 1
            assumed = self._piece_lengths(shard, offset, start, end) if k < len(counts) else None
            for piece in self._pieces(shard, offset, start, end):
                if assumed is not None and len(piece) != assumed[number - base]:
                    path = self.shards[shard]
                    raise SentenceError(
                        os.path.join(os.path.dirname(path), LENGTHS_NAME),
                        f"sentence {number - base} of {os.path.basename(path)} holds {len(piece)} tokens here, "
                        f"{assumed[number - base]} there: {ANOTHER_BUILD}",
                    )
                if number in wanted or (after is not None and number >= after):
                    yield number, piece
                number += 1
                if number == stop:
                    number = base + counts[k]
                    break

    def _batch(self, tokens: np.ndarray, docs: np.ndarray | None) -> dict[str, torch.Tensor]:
        windows = torch.from_numpy(tokens.astype(np.int64)).view(self.batch_size, self.seq_len + 1)
        batch = {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
        if docs is not None:
            rows = torch.from_numpy(docs).view(self.batch_size, self.seq_len + 1)[:, :-1]
            batch["doc_ids"] = (rows - rows[:, :1]).contiguous()
        return batch


def _shuffle(
    items: Iterable[np.ndarray], rng: np.random.Generator, buffer: list[np.ndarray] | None = None
) -> Iterator[np.ndarray]:
    """Buffer shuffle: hold SHUFFLE_BUFFER items, emit a random one for each new one, then the rest permuted.
    ``buffer`` (with ``rng`` in its state of that moment) goes on from where ``_place`` found a shuffle to stand."""
    buffer = [] if buffer is None else buffer
    for item in items:
        if len(buffer) < SHUFFLE_BUFFER:
            buffer.append(item)
            continue
        i = int(rng.integers(SHUFFLE_BUFFER))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


@dataclass
class _Place:
    """Where ``_shuffle`` stands, in numbers of the items it takes in (0, 1, ...)."""

    piece: int
    """the item being emitted"""
    offset: int
    """its tokens emitted already"""
    held: list[int]
    """the items in its buffer, by slot; when draining (``next_piece`` None), the items still to come, in order"""
    next_piece: int | None
    """the first item it has not taken in yet; None when its input has run out and it drains its buffer"""


def _place(lengths: Iterable[np.ndarray], rng: np.random.Generator, consumed: int) -> _Place:
    """Where ``_shuffle`` over items of these lengths (given chunk by chunk) stands after emitting ``consumed``
    tokens, found from the lengths alone, and ``rng`` left in the state ``_shuffle`` has there.

    Each chunk is worked out at once: ``rng.integers(n, size=k)`` draws what ``k`` calls of ``rng.integers(n)``
    draw (numpy keeps any spare bits in the generator's state), and the item a step emits is the one the last
    earlier step put in its slot, else the slot's item from before the chunk. That takes seconds for an epoch a
    reader needed hours to re-read.
    """
    size = SHUFFLE_BUFFER
    held = np.empty(0, dtype=np.int64)  # the buffer's items by slot, and their lengths
    held_lengths = np.empty(0, dtype=np.int64)
    emitted, taken = 0, 0
    for chunk in lengths:
        numbers = np.arange(taken, taken + len(chunk))
        taken += len(chunk)
        fill = min(size - len(held), len(chunk))
        held, held_lengths = np.concatenate([held, numbers[:fill]]), np.concatenate([held_lengths, chunk[:fill]])
        numbers, chunk = numbers[fill:], chunk[fill:]
        if not len(chunk):
            continue
        state = rng.bit_generator.state
        slots = rng.integers(size, size=len(chunk))
        order = np.argsort(slots, kind="stable")
        repeat = np.flatnonzero(slots[order][1:] == slots[order][:-1]) + 1  # sorted positions sharing a slot
        previous = np.full(len(chunk), -1)  # the earlier step of this chunk that filled the same slot
        previous[order[repeat]] = order[repeat - 1]
        out = np.where(previous >= 0, numbers[previous], held[slots])
        out_lengths = np.where(previous >= 0, chunk[previous], held_lengths[slots])
        ends = emitted + np.cumsum(out_lengths)
        step = int(np.searchsorted(ends, consumed, side="right"))
        if step == len(chunk):
            _settle(held, held_lengths, slots, numbers, chunk)
            emitted = int(ends[-1])
            continue
        rng.bit_generator.state = state
        rng.integers(size, size=step + 1)
        _settle(held, held_lengths, slots[: step + 1], numbers[: step + 1], chunk[: step + 1])
        offset = consumed - int(ends[step] - out_lengths[step])
        return _Place(int(out[step]), offset, held.tolist(), int(numbers[step]) + 1)
    order = rng.permutation(len(held))  # the input ran out: the buffer drains in a random order
    ends = emitted + np.cumsum(held_lengths[order])
    step = int(np.searchsorted(ends, consumed, side="right"))
    if step == len(order):
        raise ValueError(f"{consumed} tokens consumed, but the items hold {int(ends[-1]) if len(ends) else 0}")
    offset = consumed - int(ends[step] - held_lengths[order[step]])
    return _Place(int(held[order[step]]), offset, held[order[step + 1 :]].tolist(), None)


def _settle(held: np.ndarray, held_lengths: np.ndarray, slots: np.ndarray, numbers: np.ndarray, lengths: np.ndarray) -> None:
    """Put each step's item into its slot, in step order: of the steps drawing one slot, the last stays (numpy
    leaves the winner of repeated indices in one assignment undefined, so it is picked out first)."""
    order = np.argsort(slots, kind="stable")
    last = order[np.r_[slots[order][1:] != slots[order][:-1], True]]
    held[slots[last]] = numbers[last]
    held_lengths[slots[last]] = lengths[last]


def _pack(pieces: Iterable[np.ndarray], size: int, with_docs: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Pieces back to back, cut into runs of exactly ``size`` tokens (plus each token's piece number)."""
    parts: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    have = 0
    for number, piece in enumerate(pieces):
        while len(piece):
            take = min(size - have, len(piece))
            parts.append(piece[:take])
            if with_docs:
                docs.append(np.full(take, number, dtype=np.int64))
            have += take
            piece = piece[take:]
            if have == size:
                yield np.concatenate(parts), (np.concatenate(docs) if with_docs else None)
                parts, docs, have = [], [], 0
