"""An LVM's hidden states over one image's tokens, at chosen depths, computed once per split and cached.

Depth k is the residual stream after k transformer blocks (k = 0: the token embeddings; k = n_layers: the
last block's output, before the final norm). The image's tokens follow BOS when the model uses one, as an
image at the start of a visual sentence is seen; BOS's own position is not a feature.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lvm.model import LVM
from lvm.probe import ProbeError
from lvm.probe.cache import Cache

FEATURE_DTYPE = np.float16  # halves the cache; hidden states are clamped into its range (|x| <= 65504)


def resolve_depths(text: str, n_layers: int) -> list[int]:
    """`--layers` -> sorted distinct depths. Values with a decimal point are fractions of the layer count
    (0.5 of 22 blocks -> 11, rounded half up; any fraction above 0 is at least 1), integers are depths."""
    depths = set()
    for value in (v.strip() for v in text.split(",") if v.strip()):
        try:
            number = float(value) if "." in value else int(value)  # `1e-1` is no layer index (it read as layer 0)
        except ValueError:
            raise ProbeError("--layers", f"{value!r} is neither a fraction of the layers nor a layer index") from None
        if "." in value:
            if not 0.0 <= number <= 1.0:
                raise ProbeError("--layers", f"fraction {value} is outside [0, 1]")
            depth = math.floor(Fraction(value) * n_layers + Fraction(1, 2))  # exact: 0.7 of 45 is 31.5 -> 32
            depths.add(max(depth, 1) if number > 0 else 0)
        elif not 0 <= number <= n_layers:
            raise ProbeError("--layers", f"layer {value} is outside 0..{n_layers} (0: embeddings, {n_layers}: last block)")
        else:
            depths.add(int(number))
    if not depths:
        raise ProbeError("--layers", "no layers given")
    return sorted(depths)


class _Enough(Exception):
    """Raised by the hook of the deepest requested block: the blocks after it and the head are not needed."""


@torch.inference_mode()
def hidden_states(model: LVM, tokens: Tensor, depths: list[int]) -> dict[int, Tensor]:
    """{depth: hidden states [B, T, dim]} for image tokens [B, T], read with forward hooks on `model`'s
    own modules, so the features are exactly what the model computes."""
    first = model.cfg.prefix_len  # BOS's position is dropped from the features
    tokens = model.with_bos(tokens)
    found: dict[int, Tensor] = {}

    def keep(depth: int):
        def hook(module, args, output: Tensor) -> None:
            found[depth] = output[:, first:]
            if depth == depths[-1]:
                raise _Enough

        return hook

    modules = [model.embed, *model.layers]  # modules[k] outputs depth k
    handles = [modules[depth].register_forward_hook(keep(depth)) for depth in depths]
    try:
        model(tokens)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def cached_features(
    model: LVM,
    model_fingerprint: str,
    split: str,
    tokens: np.ndarray,
    depths: list[int],
    cache: Cache,
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """{depth: float16 features [N, T, dim]} of a split's tokens (memory-mapped); depths already cached
    for these tokens and this model are read, the others computed together in one pass."""
    tokens_digest = hashlib.sha1(np.ascontiguousarray(tokens).tobytes()).hexdigest()
    fingerprints = {d: hashlib.sha1(f"{model_fingerprint}:{tokens_digest}:{d}".encode()).hexdigest() for d in depths}
    names = {d: f"{split}_depth{d:03d}" for d in depths}
    features = {}
    for depth in depths:
        if (cached := cache.read(names[depth], fingerprints[depth])) is not None:
            features[depth] = cached[0]
    todo = [d for d in depths if d not in features]
    if not todo:
        return features
    device, limit = model.head.weight.device, np.finfo(FEATURE_DTYPE).max
    out = {d: cache.create(names[d], (*tokens.shape, model.cfg.dim), FEATURE_DTYPE) for d in todo}
    for start in tqdm(range(0, len(tokens), batch_size), desc=f"features {split} (depths {todo})", unit="batch"):
        batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
        for depth, states in hidden_states(model, batch, todo).items():
            out[depth][start : start + len(batch)] = states.float().clamp(-limit, limit).cpu().numpy()
    for depth in todo:
        cache.commit(names[depth], fingerprints[depth], out[depth], {"depth": depth, "split": split})
        features[depth] = cache.read(names[depth], fingerprints[depth])[0]
    return features
