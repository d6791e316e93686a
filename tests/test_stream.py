"""The packed training stream: no token lost or repeated across ranks and workers, seeding, exact resume."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import sentences.formats
import sentences.stream
from common.vocab import BOS_ID, EOS_ID
from sentences.errors import SentenceError
from sentences.formats import LENGTHS_NAME, read_sentences, write_lengths
from sentences.stream import PackedStream

SEQ, BATCH = 31, 2


def write_sentences(
    folder: Path, sentences: list[np.ndarray], per_shard: int, index: bool = True, lengths: bool = True
) -> None:
    """Sentence shards as sentences.build writes them (with index.json unless ``index`` is False, and lengths.npy
    unless ``lengths`` is False)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = {}
    for k, start in enumerate(range(0, len(sentences), per_shard)):
        path = folder / f"sentences-{k:06d}.tar"
        chunk = sentences[start : start + per_shard]
        with wds.TarWriter(str(path)) as tar:
            for i, tokens in enumerate(chunk):
                tar.write({"__key__": f"s{start + i:05d}", "tokens.npy": tokens, "json": {"kind": "test"}})
        shards[path.name] = {"sentences": len(chunk), "tokens": sum(map(len, chunk)), "bytes": path.stat().st_size}
    if index:
        (folder / "index.json").write_text(json.dumps({"shards": shards}))
        if lengths:
            write_lengths(folder, np.array([len(tokens) for tokens in sentences]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter]:
    """60 sentences of 10..150 codes, every code used once, in 9 shards of uneven size; and all their tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 150, size=60)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    sentences = [
        np.concatenate([[BOS_ID], np.arange(a, b), [EOS_ID]]).astype(np.uint16) for a, b in zip(starts[:-1], starts[1:])
    ]
    folder = tmp_path_factory.mktemp("sentences")
    write_sentences(folder, sentences, per_shard=7)
    return folder, Counter(np.concatenate(sentences).tolist())


def epoch(stream: PackedStream, workers: int) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def windows(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The seq_len + 1 token windows the batches were cut from, checking labels are inputs shifted by one."""
    rows = []
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == (BATCH, SEQ) and b["input_ids"].dtype == torch.long
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        rows.append(torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1))
    return torch.cat(rows)


def test_two_ranks_two_workers_cover_the_epoch_once(shards: tuple[Path, Counter]) -> None:
    folder, everything = shards
    per_rank = [
        epoch(PackedStream(str(folder), SEQ, BATCH, seed=1, rank=r, world_size=2, doc_ids=True), 2) for r in range(2)
    ]
    assert (
        len(per_rank[0])
        == len(per_rank[1])
        == PackedStream(str(folder), SEQ, BATCH, rank=0, world_size=2).batches_per_epoch(2)
    )
    seen = Counter(torch.cat([windows(b) for b in per_rank]).flatten().tolist())
    codes = {t: n for t, n in seen.items() if t < BOS_ID}
    assert all(n == 1 for n in codes.values())  # no code twice
    assert not seen - everything  # nothing that is not in the data
    lost = sum((everything - seen).values())
    assert 0 <= lost < 2 * 2 * BATCH * (SEQ + 1)  # only the tail that cannot fill one batch on every reader
    # batches alternate between the two workers of a rank: worker 0's first batch differs from worker 1's
    assert not torch.equal(per_rank[0][0]["input_ids"], per_rank[0][1]["input_ids"])


def test_doc_ids_change_exactly_at_sentence_starts(shards: tuple[Path, Counter]) -> None:
    folder, _ = shards
    batches = epoch(PackedStream(str(folder), SEQ, BATCH, seed=2, doc_ids=True), 0)
    cut_starts = 0
    for b in batches:
        ids, docs = b["input_ids"], b["doc_ids"]
        assert docs.shape == ids.shape and (docs[:, 0] == 0).all()
        step = docs[:, 1:] - docs[:, :-1]
        assert ((step == 0) | (step == 1)).all()
        starts = step == 1
        assert (starts >= (ids[:, 1:] == BOS_ID)).all()  # every sentence start is a new document
        cut_starts += int((starts & (ids[:, 1:] != BOS_ID)).sum())
    assert cut_starts == 0  # one reader: no sentence split between readers
    assert "doc_ids" not in epoch(PackedStream(str(folder), SEQ, BATCH, seed=2), 0)[0]


def test_same_seed_same_batches_other_seed_or_epoch_differs(shards: tuple[Path, Counter]) -> None:
    folder, _ = shards
    first = windows(epoch(PackedStream(str(folder), SEQ, BATCH, seed=7), 2))
    assert torch.equal(first, windows(epoch(PackedStream(str(folder), SEQ, BATCH, seed=7), 2)))
    assert not torch.equal(first, windows(epoch(PackedStream(str(folder), SEQ, BATCH, seed=8), 2)))
    stream = PackedStream(str(folder), SEQ, BATCH, seed=7)
    stream.set_epoch(1)
    assert not torch.equal(first, windows(epoch(stream, 2)))


def test_a_rank_reads_other_sentences_each_epoch(shards: tuple[Path, Counter]) -> None:
    """The shard order is drawn again each epoch, so the sentences a rank reads (and the tail it cannot fill into a
    whole batch and drops) change from epoch to epoch."""
    folder, _ = shards
    seen = []
    for e in range(2):
        stream = PackedStream(str(folder), SEQ, BATCH, seed=3, rank=0, world_size=4)
        stream.set_epoch(e)
        seen.append(set(windows(epoch(stream, 0)).flatten().tolist()))
    assert seen[0] != seen[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize(("workers", "consumed"), [(2, 3), (2, 4), (3, 5), (0, 6)])
def test_resume_mid_epoch_continues_exactly(shards: tuple[Path, Counter], workers: int, consumed: int) -> None:
    folder, _ = shards
    stream = PackedStream(str(folder), SEQ, BATCH, seed=3, rank=1, world_size=2)
    stream.set_epoch(2)
    full = epoch(stream, workers)
    interrupted = PackedStream(str(folder), SEQ, BATCH, seed=3, rank=1, world_size=2)
    interrupted.set_epoch(2)
    loader = iter(DataLoader(interrupted, batch_size=None, num_workers=workers))
    taken = [next(loader) for _ in range(consumed)]
    del loader  # killed with batches in flight
    state = {"epoch": 2, "batches_consumed": consumed}
    resumed = PackedStream(str(folder), SEQ, BATCH, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    rest = epoch(resumed, workers)
    assert torch.equal(windows(taken + rest), windows(full))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 sentences of 3..60 tokens in 24 shards, with index.json and lengths.npy."""
    rng = np.random.default_rng(1)
    sentences = [
        np.concatenate([[BOS_ID], rng.integers(0, 8192, n), [EOS_ID]]).astype(np.uint16)
        for n in rng.integers(1, 58, size=300)
    ]
    folder = tmp_path_factory.mktemp("many")
    write_sentences(folder, sentences, per_shard=13)
    return folder


@pytest.mark.parametrize("lengths", [True, False], ids=["lengths.npy", "by reading"])
@pytest.mark.parametrize("buffer", [1, 3, 16, 4096])
def test_resume_finds_the_shuffles_place_exactly(
    tmp_path: Path, many_shards: Path, monkeypatch: pytest.MonkeyPatch, buffer: int, lengths: bool
) -> None:
    """A resumed reader works out where its buffer shuffle stood from the sentence lengths: every position of the
    epoch continues with exactly the batches of the uninterrupted run, whether the shuffle was still filling its
    buffer, swapping items through it, or draining it at the end of the span (4096: all of this data fits)."""
    monkeypatch.setattr(sentences.stream, "SHUFFLE_BUFFER", buffer)
    folder = many_shards
    if not lengths:
        for path in many_shards.iterdir():
            if path.name != LENGTHS_NAME:
                (tmp_path / path.name).write_bytes(path.read_bytes())
        folder = tmp_path
    for seq_len, batch_size, world in [(31, 2, 2), (6, 1, 1)]:
        stream = PackedStream(str(folder), seq_len, batch_size, seed=5, rank=world - 1, world_size=world, doc_ids=True)
        stream.set_epoch(1)
        full = list(stream)
        for consumed in sorted({1, 2, len(full) // 3, len(full) // 2, len(full) - 2, len(full) - 1}):
            stream.load_state_dict({"epoch": 1, "batches_consumed": consumed})
            rest = list(stream)
            assert len(rest) == len(full) - consumed
            for got, want in zip(rest, full[consumed:]):
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_resume_from_lengths_reads_only_the_shards_still_needed(many_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Late in an epoch a resumed reader opens the few shards whose sentences its shuffle buffer still holds or
    has still to take in, not the ones it consumed (it used to re-read them all to skip them)."""
    monkeypatch.setattr(sentences.stream, "SHUFFLE_BUFFER", 4)
    stream = PackedStream(str(many_shards), 6, 1, seed=5)
    full = list(stream)
    read = Counter()
    real = sentences.stream.read_sentences
    monkeypatch.setattr(sentences.stream, "read_sentences", lambda path: read.update([path]) or real(path))
    stream.load_state_dict({"epoch": 0, "batches_consumed": len(full) - 3})
    assert [b["input_ids"].tolist() for b in stream] == [b["input_ids"].tolist() for b in full[-3:]]
    assert 1 <= len(read) <= 4 and set(read.values()) == {1}  # of the 24


def _copy(folder: Path, to: Path) -> Path:
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def _resume_at(folder: Path, consumed: int) -> list[dict[str, torch.Tensor]]:
    stream = PackedStream(str(folder), 6, 1, seed=5)
    stream.load_state_dict({"epoch": 0, "batches_consumed": consumed})
    return list(stream)


def test_lengths_of_another_build_are_refused(tmp_path: Path, many_shards: Path) -> None:
    """lengths.npy must fit its shards: by count, by each shard's tokens, by each sentence the reader opens."""
    folder = _copy(many_shards, tmp_path)
    lengths = np.load(folder / LENGTHS_NAME)
    write_lengths(folder, np.full(300, 9))
    with pytest.raises(SentenceError, match=r"lengths.npy: 117 tokens in 13 sentences of at least 9 for "
                       r"sentences-0000\d\d.tar, index.json lists [\d,]+: it belongs to another build"):
        _resume_at(folder, 3)
    write_lengths(folder, lengths[:-1])
    with pytest.raises(SentenceError, match=r"lengths.npy: int64 \(299,\), index.json lists 300 sentences"):
        _resume_at(folder, 3)
    (folder / LENGTHS_NAME).write_bytes(b"")
    with pytest.raises(SentenceError, match=r"lengths.npy: unreadable \(EOFError"):
        _resume_at(folder, 3)
    shifted = lengths.copy()  # every shard's tokens as listed, but no sentence of at least 2 tokens
    shifted[0], shifted[1] = lengths[0] + lengths[1] - 1, 1
    write_lengths(folder, shifted)
    with pytest.raises(SentenceError, match=r"at least 1 for sentences-000000.tar"):
        _resume_at(folder, 3)


def test_swapped_lengths_are_caught_in_the_shards_a_resume_reads(tmp_path: Path, many_shards: Path) -> None:
    """Lengths that add up per shard but are in the wrong order: the shards the reader opens show it."""
    folder = _copy(many_shards, tmp_path)
    lengths = np.load(folder / LENGTHS_NAME)
    for first in range(0, 299, 13):  # in every shard of two or more, its first two sentences swapped
        lengths[first], lengths[first + 1] = lengths[first + 1], lengths[first]
    assert (lengths != np.load(many_shards / LENGTHS_NAME)).any()
    write_lengths(folder, lengths)
    with pytest.raises(SentenceError, match=r"lengths.npy: sentence \d+ of sentences-0000\d\d.tar holds \d+ tokens "
                       r"here, \d+ there: it belongs to another build"):
        _resume_at(folder, 100)


def test_without_usable_lengths_a_resume_re_reads(tmp_path: Path, many_shards: Path) -> None:
    """An index.json without per-shard counts (another tool's) places no shard in lengths.npy."""
    folder = _copy(many_shards, tmp_path)
    index = json.loads((folder / "index.json").read_text())
    for entry in index["shards"].values():
        del entry["sentences"]
    (folder / "index.json").write_text(json.dumps(index))
    full = list(PackedStream(str(many_shards), 6, 1, seed=5))
    assert [b["input_ids"].tolist() for b in _resume_at(folder, 100)] == [b["input_ids"].tolist() for b in full[100:]]


# Review 35: spans that end exactly on sentence and shard ends, mixed folders, indexes without counts.
@pytest.fixture(params=[4, 3], ids=["span ends on shard ends", "span ends mid-shard"])
def aligned(tmp_path: Path, request) -> Path:
    """64 sentences of exactly 8 tokens, 4 per shard (32 tokens a shard): with seq_len 7 and batch 1 (8 tokens a
    batch) and 2 readers, every span boundary falls on a sentence and on a shard boundary."""
    rng = np.random.default_rng(3)
    sentences = [np.concatenate([[BOS_ID], rng.integers(0, 8192, 6), [EOS_ID]]).astype(np.uint16) for _ in range(64)]
    write_sentences(tmp_path / "aligned", sentences, per_shard=request.param)
    return tmp_path / "aligned"


def test_spans_on_shard_and_sentence_boundaries(aligned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentences.stream, "SHUFFLE_BUFFER", 3)
    shard_of = {tuple(t.tolist()): str(p) for p in sorted(aligned.glob("*.tar")) for _, t, _ in read_sentences(str(p))}
    read = Counter()
    real = sentences.stream.read_sentences
    monkeypatch.setattr(sentences.stream, "read_sentences", lambda path: read.update([path]) or real(path))
    for rank in (0, 1):
        read.clear()
        stream = PackedStream(str(aligned), 7, 1, seed=5, rank=rank, world_size=2, doc_ids=True)
        full = list(stream)
        assert len(full) == 32 and set(read.values()) == {1}
        mine = {shard_of[tuple(torch.cat([b["input_ids"][0], b["labels"][0, -1:]]).tolist())] for b in full}
        assert set(read) == mine  # the shards holding its sentences, no other
        for b in full:  # whole sentences only: no empty pieces, no sentence cut
            step = b["doc_ids"][:, 1:] - b["doc_ids"][:, :-1]
            assert ((step == 0) | (step == 1)).all() and b["input_ids"][0, 0] == BOS_ID
        for consumed in range(1, len(full)):
            stream.load_state_dict({"epoch": 0, "batches_consumed": consumed})
            read.clear()
            rest = list(stream)
            assert len(rest) == len(full) - consumed
            # a resume opens only shards holding sentences still to come (one batch = one whole sentence here)
            assert set(read) == {shard_of[tuple(torch.cat([b["input_ids"][0], b["labels"][0, -1:]]).tolist())] for b in rest}
            for got, want in zip(rest, full[consumed:]):
                assert all(torch.equal(got[k], want[k]) for k in got)


def test_an_index_out_of_date_is_refused(aligned: Path) -> None:
    index = json.loads((aligned / "index.json").read_text())
    entry = index["shards"]["sentences-000003.tar"]
    entry["tokens"] += 8
    (aligned / "index.json").write_text(json.dumps(index))
    (aligned / LENGTHS_NAME).unlink()
    with pytest.raises(SentenceError, match=r"sentences-000003.tar: holds (32|24) tokens, expected (40|32) \(index.json out of date"):
        for _ in range(4):
            for rank in (0, 1):
                list(PackedStream(str(aligned), 7, 1, seed=5, rank=rank, world_size=2))


def test_a_fresh_epoch_does_not_read_lengths(aligned: Path) -> None:
    """lengths.npy is only for resuming: a fresh epoch neither needs it nor is stopped by a broken one."""
    full = list(PackedStream(str(aligned), 7, 1, seed=5))
    (aligned / LENGTHS_NAME).write_bytes(b"")
    assert [b["input_ids"].tolist() for b in PackedStream(str(aligned), 7, 1, seed=5)] == [b["input_ids"].tolist() for b in full]


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(4)
    def some(n):
        return [np.concatenate([[BOS_ID], rng.integers(0, 8192, k), [EOS_ID]]).astype(np.uint16) for k in rng.integers(1, 40, n)]
    write_sentences(tmp_path / "a", some(40), per_shard=5)
    write_sentences(tmp_path / "b", some(40), per_shard=5)
    (tmp_path / "b" / LENGTHS_NAME).unlink()  # an older build: no lengths.npy
    return tmp_path / "a", tmp_path / "b"


def test_a_resume_over_folders_with_and_without_lengths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sentences.stream, "SHUFFLE_BUFFER", 3)
    a, b = _two_folders(tmp_path)
    shards = sorted(map(str, a.glob("*.tar"))) + sorted(map(str, b.glob("*.tar")))
    stream = PackedStream(shards, 6, 1, seed=5)
    full = list(stream)
    for consumed in range(1, len(full), 7):
        stream.load_state_dict({"epoch": 0, "batches_consumed": consumed})
        assert [x["input_ids"].tolist() for x in stream] == [x["input_ids"].tolist() for x in full[consumed:]]


def test_an_index_without_token_counts_resumes_by_reading(aligned: Path) -> None:
    index = json.loads((aligned / "index.json").read_text())
    for entry in index["shards"].values():
        del entry["tokens"]
    (aligned / "index.json").write_text(json.dumps(index))
    stream = PackedStream(str(aligned), 7, 1, seed=5)
    full = list(stream)
    stream.load_state_dict({"epoch": 0, "batches_consumed": 20})
    assert [x["input_ids"].tolist() for x in stream] == [x["input_ids"].tolist() for x in full[20:]]


def test_float_lengths_are_refused(aligned: Path) -> None:
    np.save(aligned / LENGTHS_NAME, np.load(aligned / LENGTHS_NAME).astype(np.float64))
    stream = PackedStream(str(aligned), 7, 1, seed=5)
    stream.load_state_dict({"epoch": 0, "batches_consumed": 20})
    with pytest.raises(SentenceError, match=r"lengths.npy: float64"):
        list(stream)


def test_a_resume_over_many_folders_reads_each_index_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader visits its shards' folders in shuffled order: with a bounded cache of 64 folders, 70 folders parsed
    their index.json (15 MB for a LAION-size build) again and again."""
    rng = np.random.default_rng(6)
    for k in range(70):
        write_sentences(tmp_path / f"build{k:02d}", [np.concatenate([[BOS_ID], rng.integers(0, 8192, 9), [EOS_ID]])
                                                   .astype(np.uint16) for _ in range(4)], per_shard=4)
    monkeypatch.setattr(sentences.stream, "SHUFFLE_BUFFER", 2)
    stream = PackedStream(str(tmp_path), 6, 1, seed=5)
    full = list(stream)
    parsed = Counter()
    real = sentences.formats.indexed_shards
    monkeypatch.setattr(sentences.formats, "indexed_shards", lambda folder: parsed.update([folder]) or real(folder))
    stream.load_state_dict({"epoch": 0, "batches_consumed": len(full) - 2})
    assert [b["input_ids"].tolist() for b in stream] == [b["input_ids"].tolist() for b in full[-2:]]
    assert len(parsed) == 70 and set(parsed.values()) == {1}


def test_a_position_at_the_epochs_end_yields_nothing_and_reads_nothing(
    shards: tuple[Path, Counter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint saved on an epoch's last batch: the resumed stream re-read the whole epoch to skip it all."""
    folder, _ = shards
    stream = PackedStream(str(folder), SEQ, BATCH, seed=3, rank=1, world_size=2)
    stream.load_state_dict({"epoch": 2, "batches_consumed": stream.batches_per_epoch()})
    monkeypatch.setattr("sentences.stream.read_sentences", lambda shard: pytest.fail(f"read {shard}"))
    assert list(stream) == []
    stream.load_state_dict({"epoch": 2, "batches_consumed": stream.batches_per_epoch() - 1})  # one batch left
    with pytest.raises(pytest.fail.Exception, match="read "):
        list(stream)


def test_shards_without_index_are_counted_by_reading(tmp_path: Path, shards: tuple[Path, Counter]) -> None:
    folder, _ = shards
    with_index = PackedStream(str(folder), SEQ, BATCH, seed=4)
    (tmp_path / "plain").mkdir()
    for shard in folder.glob("*.tar"):
        (tmp_path / "plain" / shard.name).write_bytes(shard.read_bytes())
    plain = PackedStream(str(tmp_path / "plain"), SEQ, BATCH, seed=4)
    assert np.array_equal(plain.tokens, with_index.tokens)
    assert torch.equal(windows(epoch(plain, 0)), windows(epoch(with_index, 0)))


def test_shards_are_counted_once_until_they_change(
    tmp_path: Path, shards: tuple[Path, Counter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without index.json every count reads the shards in full; a run asks for them several times (the resume
    checks, each epoch's stream): once is enough while the files stay as they are."""
    folder, _ = shards
    (tmp_path / "plain").mkdir()
    for shard in folder.glob("*.tar"):
        (tmp_path / "plain" / shard.name).write_bytes(shard.read_bytes())
    read = Counter()
    real = sentences.stream.read_sentences
    monkeypatch.setattr(sentences.stream, "read_sentences", lambda path: read.update([path]) or real(path))
    first = PackedStream(str(tmp_path / "plain"), SEQ, BATCH, seed=4).tokens
    again = PackedStream(str(tmp_path / "plain"), SEQ, BATCH, seed=5).tokens
    assert len(read) == 9 and set(read.values()) == {1} and np.array_equal(first, again)
    plain = sorted((tmp_path / "plain").glob("*.tar"))
    plain[0].write_bytes(plain[-1].read_bytes())  # a shard replaced: counted again, the others not
    assert PackedStream(str(tmp_path / "plain"), SEQ, BATCH, seed=4).tokens[0] == again[-1]
    assert read[str(plain[0])] == 2 and read[str(plain[1])] == 1


def test_out_of_vocabulary_id_is_an_error_naming_the_shard(tmp_path: Path) -> None:
    write_sentences(tmp_path, [np.array([BOS_ID, 1, 2, 8292, EOS_ID], dtype=np.uint16)] * 20, per_shard=20)
    with pytest.raises(  # the first id past the vocabulary: the model's embedding has no row for it
        SentenceError,
        match=r"sentences-000000.tar: sentence 's00000': token id 8292 outside the vocabulary \[0, 8292\)",
    ):
        list(PackedStream(str(tmp_path), seq_len=3))


def test_an_index_of_another_format_is_refused(tmp_path: Path, shards: tuple[Path, Counter]) -> None:
    folder, _ = shards
    for shard in folder.glob("*.tar"):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "index.json").write_text(json.dumps({"format": "lvm-sentences/2", "shards": {}}))
    with pytest.raises(SentenceError, match=r"index.json: format 'lvm-sentences/2', this version reads 'lvm-sentences/1'"):
        PackedStream(str(tmp_path), SEQ, BATCH)


@pytest.mark.parametrize("ends", [(False, False), (True, False), (False, True)], ids=["bare", "no EOS", "no BOS"])
def test_token_shards_given_as_sentences_are_an_error(tmp_path: Path, ends: tuple[bool, bool]) -> None:
    """lvm.tokenize's shards also hold `tokens.npy`: bare image codes, no BOS/EOS. Training on them must stop, and so
    must it on a sentence cut off before its EOS: the model would never learn where a sentence ends."""
    bos, eos = ends
    tokens = np.concatenate([[BOS_ID] * bos, np.arange(16), [EOS_ID] * eos]).astype(np.uint16)
    write_sentences(tmp_path, [tokens] * 20, per_shard=20, index=False)
    with pytest.raises(SentenceError, match=r"sentences-000000.tar: sentence 's00000': not \[BOS 8192, \.\.\., EOS 8193\] "
                       r"\(token shards of lvm.tokenize are not sentences"):
        list(PackedStream(str(tmp_path), seq_len=3))


@pytest.mark.parametrize("index", [True, False])
def test_a_shard_cut_short_between_sentences_stops_training(tmp_path: Path, shards: tuple[Path, Counter], index: bool) -> None:
    """Python's tarfile reads a tar cut between two members as a complete, shorter archive: with index.json its
    listed size gives the cut away, without it the missing end-of-archive blocks do."""
    folder, _ = shards
    for shard in folder.glob("*"):
        if index or shard.suffix == ".tar":
            (tmp_path / shard.name).write_bytes(shard.read_bytes())
    cut = tmp_path / "sentences-000003.tar"
    with tarfile.open(cut) as tar:
        boundary = tar.getmembers()[6].offset  # the header of the 4th sentence's first member
    cut.write_bytes(cut.read_bytes()[:boundary])
    message = "bytes, but index.json lists" if index else r"damaged tar \(ReadError: cut short"
    with pytest.raises(SentenceError, match=f"sentences-000003.tar: .*{message}"):
        list(PackedStream(str(tmp_path), SEQ, BATCH))


def test_too_little_data_for_every_reader_is_an_error(shards: tuple[Path, Counter]) -> None:
    folder, _ = shards
    with pytest.raises(SentenceError, match="cannot give one batch of 64 x 4097 tokens to each of 1 readers"):
        list(PackedStream(str(folder), seq_len=4096, batch_size=64))
