"""A data module whose global batches do not depend on the number of ranks, for comparing sharded runs.

Micro-batch `n` of the whole run is `batch_size x world_size` rows drawn from a generator seeded with `n`;
rank r trains on its r-th block of `batch_size` rows. A 1-rank run with batch 4 and a 2-rank run with
batch 2 therefore see the same rows at every step. Rows look like visual sentences (BOS, then codes) so
that `SampleImages` finds a prompt in them. The position (micro-batches consumed) is saved in checkpoints,
so a resumed run continues with the next batch.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from common.vocab import BOS_ID, CODEBOOK_SIZE


class _Rows(IterableDataset):
    def __init__(self, start: int, batch_size: int, seq_len: int, rank: int, world: int) -> None:
        self.start, self.batch_size, self.seq_len, self.rank, self.world = start, batch_size, seq_len, rank, world

    def __iter__(self):
        n = self.start
        while True:
            g = torch.Generator().manual_seed(n)
            rows = torch.randint(0, CODEBOOK_SIZE, (self.batch_size * self.world, self.seq_len + 1), generator=g)
            rows[:, 0] = BOS_ID
            mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield {"input_ids": mine[:, :-1], "labels": mine[:, 1:]}
            n += 1


class GlobalBatches(L.LightningDataModule):
    def __init__(self, batch_size: int = 2, seq_len: int = 32) -> None:
        super().__init__()
        self.batch_size, self.seq_len = batch_size, seq_len
        self.batches_consumed = 0

    def train_dataloader(self) -> DataLoader:
        rows = _Rows(self.batches_consumed, self.batch_size, self.seq_len, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(rows, batch_size=None)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = state["batches_consumed"]
