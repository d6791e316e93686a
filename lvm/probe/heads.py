"""The two probes and how they are trained on frozen features.

- `AttentiveProbe` (Toto, AIM, V-JEPA): one learned query cross-attends, multi-head, over an image's
  token features, then a linear head. It can pick out the tokens that matter, so it reads a model whose
  information sits in a few positions.
- `LinearProbe`: the mean of the token features, standardised with the train statistics, then a linear
  head. The baseline: what is linearly there on average.

Both train with AdamW from a fixed seed on the train split minus a stratified holdout, and keep the epoch
with the lowest holdout loss (smoother than the accuracy of a small holdout); training stops `patience`
epochs after it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lvm.probe import ProbeError


class AttentiveProbe(nn.Module):
    """Features [B, T, dim] -> logits [B, classes] through one learned query's multi-head cross-attention."""

    def __init__(self, dim: int, classes: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, features: Tensor) -> Tensor:
        tokens = self.norm(features)
        pooled, _ = self.attn(self.query.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
        return self.head(pooled[:, 0])


class LinearProbe(nn.Module):
    """Mean-pooled features [B, dim] -> logits [B, classes]: standardised, then one linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = nn.Linear(len(mean), classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.head((pooled - self.mean) / self.std)


def mean_pool(features: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[N, T, dim] (possibly memory-mapped float16) -> float32 [N, dim], a chunk at a time."""
    return np.concatenate([features[i : i + chunk].astype(np.float32).mean(1) for i in range(0, len(features), chunk)])


@dataclass(frozen=True)
class Training:
    """How every probe is trained (the same for all depths and both probe types)."""

    epochs: int = 100  # at most
    patience: int = 20  # epochs without a lower holdout loss before stopping
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch_size: int = 32  # small: a few dozen images per class still make several steps per epoch
    holdout: float = 0.2  # share of each train class held out for early stopping
    seed: int = 0


@dataclass
class Result:
    """One probe's accuracies at one depth."""

    top1: float  # on the val split, with the chosen epoch's weights
    holdout_top1: float
    best_epoch: int  # 1-based
    epochs: int  # trained before stopping


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, holdout indices): per class a seeded random `fraction` held out, at least one image
    when the class has two or more, so every class can be scored when choosing the epoch."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held.append(members[:n])
        fit.append(members[n:])
    if not sum(map(len, held)):
        raise ProbeError("--train", "every class has a single image: none to hold out for early stopping")
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def _batch(inputs: np.ndarray, labels: np.ndarray, index: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    index = np.sort(index)  # memory-mapped features read fastest in order
    x = torch.from_numpy(np.asarray(inputs[index], dtype=np.float32)).to(device)
    return x, torch.from_numpy(labels[index]).to(device)


@torch.no_grad()
def score(probe: nn.Module, inputs: np.ndarray, labels: np.ndarray, index: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of `probe` on inputs[index]."""
    probe.eval()
    device = next(probe.parameters()).device
    correct, loss = 0, 0.0
    for start in range(0, len(index), batch_size):
        x, y = _batch(inputs, labels, index[start : start + batch_size], device)
        logits = probe(x)
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
    return correct / len(index), loss / len(index)


def train(
    probe: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    fit: np.ndarray,
    holdout: np.ndarray,
    settings: Training,
) -> tuple[nn.Module, float, int, int]:
    """Train `probe` (already on its device) on inputs[fit]; returns it with the weights of the best holdout
    epoch, that epoch's holdout accuracy, the epoch (1-based) and the epochs run."""
    device = next(probe.parameters()).device
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    best_loss, best_accuracy, best_epoch, epoch = float("inf"), 0.0, 0, 0
    best_state = copy.deepcopy(probe.state_dict())  # kept if no epoch has a finite holdout loss
    for epoch in range(1, settings.epochs + 1):
        probe.train()
        order = fit[torch.randperm(len(fit), generator=generator).numpy()]
        for start in range(0, len(order), settings.batch_size):
            x, y = _batch(inputs, labels, order[start : start + settings.batch_size], device)
            loss = F.cross_entropy(probe(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy, holdout_loss = score(probe, inputs, labels, holdout, settings.batch_size)
        if holdout_loss < best_loss:
            best_loss, best_accuracy, best_epoch = holdout_loss, accuracy, epoch
            best_state = copy.deepcopy(probe.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    probe.load_state_dict(best_state)
    return probe, best_accuracy, best_epoch, epoch


def run_probe(
    kind: str,
    features: np.ndarray,
    labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    classes: int,
    heads: int,
    settings: Training,
    device: torch.device,
) -> Result:
    """Train one probe ('attentive' on token features, 'linear' on mean-pooled ones) and score it on val."""
    fit, holdout = holdout_split(labels, settings.holdout, settings.seed)
    torch.manual_seed(settings.seed)
    if kind == "attentive":
        probe = AttentiveProbe(features.shape[-1], classes, heads)
    else:
        features, val_features = mean_pool(features), mean_pool(val_features)
        stats = torch.from_numpy(features[fit])
        probe = LinearProbe(stats.mean(0), stats.std(0).clamp_min(1e-6), classes)
    probe, holdout_top1, best_epoch, epochs = train(probe.to(device), features, labels, fit, holdout, settings)
    top1, _ = score(probe, val_features, val_labels, np.arange(len(val_labels)), settings.batch_size)
    return Result(top1, holdout_top1, best_epoch, epochs)
