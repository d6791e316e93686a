"""LVMDataModule: the packed sentence stream (`sentences.stream.PackedStream`) for Lightning, resumable exactly.

Exact resume works by counting: the datamodule counts the training batches this rank has consumed in the
current epoch, Lightning stores that count with every checkpoint (`state_dict`) and restores it before the
dataloader is iterated (`load_state_dict`), and the stream then starts at the next batch. Batches that were
prefetched but not yet trained are produced again, so a resumed run neither repeats nor skips a batch. This
needs the same shards, seed, batch shape, `num_workers` and number of devices as the run that saved the
checkpoint: the count means another place in the stream under any other. The checkpoint records them all, and a
resume with others is refused by name. The stream finds its place from the sentence lengths of the build
(``lengths.npy``); shards without them are re-read up to it, which late in an epoch takes a while: the resume
says which in one line.

One Lightning epoch is one pass of the stream (the stream's epochs reshuffle with `(seed, epoch)`); runs are
bounded by `trainer.max_steps`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from common.errors import check_settings, lightning_worker_init, warn
from common.files import expand_shards
from common.progress import clock
from lvm.errors import ConfigError
from sentences.errors import SentenceError
from sentences.formats import check_folders_whole, has_lengths, longest_sentence, sentences_tokenizer, tokens_per_image
from sentences.stream import PackedStream, shard_tokens

# val_dataloader() returns [] when there are no val_shards, which is how a datamodule turns validation off;
# Lightning still warns that the list is empty.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")

_SKIP_TOKENS_PER_S = 1e6
"""Tokens one reader re-reads per second to skip consumed batches of shards without lengths.npy: measured with
single-image sentences (the worst case: tar headers bound it, per sentence) on a 2-core CPU. Only for the
estimate the resume line gives."""

_LAYOUT_FIXES = {
    "num_workers": "set data.num_workers: {saved}",
    "world_size": "resume on {saved} devices in all (docs/training.md: when the device count changes for good)",
    "batch_size": "set data.batch_size: {saved} (change it only when starting a run)",
    "seq_len": "set data.seq_len: {saved}",
    "seed": "set data.seed: {saved}",
    "train_shards": "give data.train_shards the shards the checkpoint was trained on",
}
"""What decides which batches a stream position points at, besides the position, and what to do when a resume
has another value than the checkpoint."""


class _PositionedLoader(DataLoader):
    """A DataLoader that puts its stream at the right (epoch, batch) each time it is iterated.

    Lightning iterates the train loader once per epoch, and the workers receive a copy of the stream at that
    moment, so `__iter__` is the one place where both a new epoch and a restored position reach the workers.
    """

    def __init__(self, stream: PackedStream, position: Callable[[], dict], rank: int, **kwargs) -> None:
        super().__init__(stream, batch_size=None, worker_init_fn=functools.partial(lightning_worker_init, rank=rank),
                         **kwargs)
        self._position = position

    def __iter__(self) -> Iterator:
        self.dataset.load_state_dict(self._position())
        return super().__iter__()


def check_data_settings(seq_len: int, batch_size: int, num_workers: int, seed: int) -> None:
    """The data module's numbers, checked when it is built and by the dry run (which lists no shards)."""
    check_settings("data", ((field, value, value >= low, f"must be >= {low}") for field, value, low in (
        ("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("seed", seed, 0))),
        ConfigError)


class LVMDataModule(L.LightningDataModule):
    """Packed visual sentences for training (and optionally validation).

    Args:
        train_shards: sentence shards (`python -m sentences.build` output): a folder, a glob, a brace
            pattern (`sent/{00000..00999}.tar`) or a list of these.
        val_shards: held-out sentence shards for `val/loss`; none by default.
        seq_len: tokens per training row (the model's context, 4096 in the paper).
        batch_size: rows per device per micro-batch; tokens per optimizer step =
            batch_size x seq_len x trainer.accumulate_grad_batches x devices x num_nodes.
        num_workers: dataloader processes per device (part of the resume position: keep it when resuming).
        seed: shuffling seed of the stream.
        doc_ids: also emit sentence ids so the model masks attention across packed sentences
            (the release did not; off by default).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        seq_len: int = 4096,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: int = 0,
        doc_ids: bool = False,
    ) -> None:
        super().__init__()
        check_data_settings(seq_len, batch_size, num_workers, seed)
        # Listed once here and reused (stream, resume checks): a glob over a million shards takes seconds.
        self._paths: dict[str, list[str]] = {}
        for field, shards in (("train_shards", train_shards), ("val_shards", val_shards)):
            if shards is not None:
                try:  # lists the files only; nothing is read before training starts
                    self._paths[field] = expand_shards(shards)
                except ValueError as e:
                    how = "; make them with `python -m sentences.build --spec mix.yaml --out DIR` (docs/sentences.md)"
                    raise ConfigError(f"data.{field}: {e}{how}") from None
                try:
                    check_folders_whole(shards, self._paths[field])
                except SentenceError as e:
                    raise ConfigError(f"data.{field}: {e}") from None
        every = self._paths["train_shards"] + self._paths.get("val_shards", [])
        try:
            # The tokenizer that made these sentences (their index.json), saved into checkpoints by LVMModule; the
            # validation sentences must come from it too, or val/loss measures tokens the model never learnt.
            self.tokenizer: dict | None = sentences_tokenizer(every)
            image = tokens_per_image(every)
            longest = longest_sentence(every)
        except SentenceError as e:
            raise ConfigError(f"data.{'train_shards, data.val_shards' if val_shards is not None else 'train_shards'}: {e}") from None
        if longest and seq_len + 2 < longest:  # a row is seq_len + 1 tokens; BOS and EOS are beyond the build's
            # window, and a release-shaped build (window 4096) at seq_len 4096 loses no more than an EOS
            rank_zero_only(warn)(f"data.seq_len {seq_len}: the longest sentence has {longest} tokens (lengths.npy), and "
                                 f"rows of {seq_len + 1} cut it and those like it, so the model never sees them whole; "
                                 "train with a longer context, or build the sentences for this one")
        elif image and seq_len < 2 * image:  # a row is seq_len + 1 tokens: inputs and the label after them
            rank_zero_only(warn)(f"data.seq_len {seq_len} holds no two images of {image} tokens (BOS + 2 x {image}): no row "
                           "shows the model an image after another, so it learns single images only; give it a context "
                           f"of several images (--data.seq_len and --model.overrides max_seq_len, e.g. {8 * image})")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.seed, self.doc_ids = seed, doc_ids
        self.epoch, self.batches_consumed = 0, 0
        # Batches of completed optimizer steps, as counted when the global step last moved (None: not yet seen).
        self._trained, self._step_seen = 0, None
        self._lightning_epoch: int | None = None  # Lightning's epoch when the loader was last iterated

    def _stream(self, field: str) -> PackedStream:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (None, None)
        return PackedStream(self._paths[field], self.seq_len, self.batch_size, self.seed, rank, world, self.doc_ids)

    def _loader(self, stream: PackedStream, position: Callable[[], dict]) -> DataLoader:
        try:  # here, in the main process: raised in a worker, the error would come wrapped in its traceback
            stream.batches_per_epoch(self.num_workers)
        except SentenceError as e:
            raise ConfigError(f"data: {e}; fewer data.num_workers or devices, or a smaller batch, fit") from None
        return _PositionedLoader(
            stream,
            position,
            self.trainer.global_rank if self.trainer else 0,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,  # workers must see each epoch's new position
        )

    def _train_position(self) -> dict:
        """Called when the train loader is iterated: a new Lightning epoch after batches of this one starts the
        stream's next epoch. The stream counts its own passes: a run resumed from a checkpoint saved on an epoch's
        last batch has Lightning end that epoch at once, with no batch, and start another; counting Lightning's
        epochs would skip a whole pass of the data there."""
        current = self.trainer.current_epoch if self.trainer else 0
        if self._lightning_epoch is not None and current > self._lightning_epoch and self.batches_consumed > 0:
            self.epoch, self.batches_consumed, self._trained = self.epoch + 1, 0, 0
        self._lightning_epoch = current
        return self._position(self.epoch, self.batches_consumed)

    def train_dataloader(self) -> DataLoader:
        # Built here, not in setup(), so that config checks in the module's setup() run before any shard is read.
        return self._loader(self._stream("train_shards"), self._train_position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":  # it validated nothing, exit 0
                raise ConfigError("data.val_shards: not set; lightning validate measures val/loss on it")
            return []
        return self._loader(self._stream("val_shards"), lambda: {"epoch": 0, "batches_consumed": 0})

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is None or self.trainer.training:
            step = self.trainer.global_step if self.trainer else 0
            if step != self._step_seen:  # an optimizer step completed since the last batch: all before this one count
                self._trained, self._step_seen = self.batches_consumed, step
            self.batches_consumed += 1
        return batch

    def _position_saved(self) -> int:
        """The batches a checkpoint may count as trained: those of completed optimizer steps. A periodic or
        SIGTERM checkpoint is saved after a step, when that is every batch consumed; one saved on an exception
        (Ctrl-C, a crash) may come mid-step or mid-accumulation, whose batches were not trained: they come again."""
        if self.trainer is None or self.trainer.global_step != self._step_seen:
            return self.batches_consumed
        return self._trained

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    @functools.cached_property
    def _shards_id(self) -> str:
        """The train shards as the stream sees them: their count, tokens and a digest of their names and token
        counts in order. Names without their folder: a copy of the shards elsewhere yields the same batches."""
        paths = self._paths["train_shards"]
        tokens = shard_tokens(paths)
        digest = hashlib.sha256(repr([(os.path.basename(p), int(t)) for p, t in zip(paths, tokens)]).encode())
        return f"{len(paths)} shards, {int(tokens.sum()):,} tokens, sha256 {digest.hexdigest()[:16]}"

    def _layout(self) -> dict:
        """What a stream position counts in, keyed as `_LAYOUT_FIXES`."""
        return {"num_workers": self.num_workers, "world_size": self._world_size(), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "seed": self.seed, "train_shards": self._shards_id}

    def _position(self, epoch: int, batches_consumed: int) -> dict:
        """A stream position, with the layout it counts in: which batches come next depends on all of it."""
        return {"epoch": epoch, "batches_consumed": batches_consumed, **self._layout()}

    def state_dict(self) -> dict:
        """The position a checkpoint saves: after the batches of finished optimizer steps."""
        return self._position(self.epoch, self._position_saved())

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position, refusing one counted in another layout, where the count would point
        elsewhere in the stream: the run would repeat and skip data silently. Only a fit reads the training stream:
        `lightning validate` of a checkpoint takes any layout (one device for a run of eight)."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        for key, now in self._layout().items():
            saved = state.get(key, now)  # checkpoints from before a key was recorded lack it
            if saved != now:
                raise ConfigError(
                    f"data.{key}: the checkpoint's stream position was counted with {key} {saved!r}, this run has "
                    f"{now!r}; the stream would go on with other batches than it left off: "
                    + _LAYOUT_FIXES[key].format(saved=saved)
                )
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        self._trained, self._step_seen, self._lightning_epoch = self.batches_consumed, None, None
        if self.batches_consumed and (self.trainer is None or self.trainer.is_global_zero):
            # at the epoch's end the stream reads nothing (Lightning then starts the next epoch): no note
            if self.batches_consumed < self._stream("train_shards").batches_per_epoch(self.num_workers):
                print(self._skip_note(), file=sys.stderr, flush=True)

    def _skip_note(self) -> str:
        """The resume's one line: a reader whose shards have no lengths.npy re-reads what it already gave this epoch
        before its first batch, which late in an epoch takes long enough to pass for a hang. Each reader decides for
        its own shards (`PackedStream`), so with some folders built before lengths.npy only some readers re-read."""
        head = f"resuming epoch {self.epoch} after {self.batches_consumed:,} batches per device: "
        by_folder: dict[str, list[str]] = {}
        for path in self._paths["train_shards"]:
            by_folder.setdefault(os.path.dirname(path), []).append(path)
        try:
            lacking = [folder for folder, shards in by_folder.items() if not has_lengths(shards)]
        except SentenceError as e:
            raise ConfigError(f"data.train_shards: {e}") from None
        if not lacking:
            return head + "each reader finds its place from the sentence lengths (lengths.npy) and reads only the shards it still needs"
        readers = max(1, self.num_workers)
        batches = -(-self.batches_consumed // readers)  # the most any worker skips (its share of the round-robin)
        tokens = batches * self.batch_size * (self.seq_len + 1)
        if len(lacking) == len(by_folder):
            who = f"each of its readers ({readers} per device)"
        else:
            more = f" and {len(lacking) - 1:,} more" if len(lacking) > 1 else ""
            who = (f"each reader ({readers} per device) with shards of {lacking[0]}{more} (the other folders have "
                   "lengths.npy)")
        return head + (
            f"{who} first re-reads ~{tokens:,} tokens ({batches:,} batches) to skip them, "
            f"~{clock(tokens / _SKIP_TOKENS_PER_S)} at the ~{_SKIP_TOKENS_PER_S / 1e6:g}M tokens/s per reader of a "
            "2-core CPU (shards without lengths.npy: run their sentences.build again, which keeps them and adds it)"
        )
