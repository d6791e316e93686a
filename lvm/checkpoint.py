"""One loader for every model file a user brings: `load_lvm(path) -> LVM`.

- our Lightning checkpoints (`*.ckpt`): `state_dict` keys `model.*` and
  `checkpoint["lvm_config"]` (an `LVMConfig.to_dict()`);
- Hugging Face `LlamaForCausalLM` directories (config.json + safetensors or
  `pytorch_model*.bin` shards), such as the released LVM-7B.

Both paths build the model on the meta device and assign the stored tensors
(`load_state_dict(assign=True)`), so no random initialisation runs and peak
memory stays near the model's size; HF shards are streamed one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import UserError
from lvm import hf
from lvm.model import LVM, LVMConfig, rope_tables


class CheckpointError(UserError):
    """A model file or directory that cannot be loaded: `CheckpointError(path, problem)`."""


def load_lvm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LVM:
    """Load an LVM in eval mode from our `.ckpt` or an HF Llama directory; `dtype` None keeps the stored one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(path, "not a Hugging Face model directory (no config.json)")
        cfg, tensors = _hf_source(path)
    else:
        cfg, tensors = _lightning_source(path)
    return _materialize(path, cfg, tensors, torch.device(device), dtype)


def _lightning_source(path: Path) -> tuple[LVMConfig, Iterator[tuple[str, torch.Tensor]]]:
    # Our own training checkpoints also pickle Lightning/optimizer state, so weights_only=False:
    # load only checkpoints you trust. mmap keeps tensors on disk until they are assigned.
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "lvm_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(path, "not an LVM training checkpoint (no 'lvm_config' / 'state_dict')")
    try:
        cfg = LVMConfig.from_dict(ckpt["lvm_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid lvm_config: {e}") from e
    tensors = ((k.removeprefix("model."), v) for k, v in ckpt["state_dict"].items() if k.startswith("model."))
    return cfg, tensors


def _hf_source(path: Path) -> tuple[LVMConfig, Iterator[tuple[str, torch.Tensor]]]:
    try:
        cfg = hf.config_from_hf(json.loads((path / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as e:
        problem = f"missing config field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(path / "config.json", problem) from e
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not shards:
        raise CheckpointError(path, "no *.safetensors or pytorch_model*.bin weight files")
    return cfg, _hf_tensors(shards)


def _hf_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) one at a time, one shard open at a time."""
    for shard in shards:
        if shard.suffix == ".safetensors":
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if (name := _our_name(shard, key)) is not None:
                        yield name, f.get_tensor(key)
        else:
            for key, tensor in torch.load(shard, map_location="cpu", mmap=True, weights_only=True).items():
                if (name := _our_name(shard, key)) is not None:
                    yield name, tensor


def _our_name(shard: Path, key: str) -> str | None:
    try:
        return hf.our_name(key)
    except KeyError as e:
        raise CheckpointError(shard, e.args[0]) from e


def _materialize(
    path: Path,
    cfg: LVMConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
) -> LVM:
    with torch.device("meta"):
        model = LVM(cfg)
    expected = dict(model.state_dict())
    for name, tensor in tensors:
        if name not in expected:
            raise CheckpointError(path, f"unexpected weight {name!r} for this config")
        if tensor.shape != expected[name].shape:
            want = tuple(expected[name].shape)
            raise CheckpointError(path, f"{name}: shape {tuple(tensor.shape)} != {want} expected from the config")
        # assign=True adopts the (converted) tensor instead of copying into a meta one.
        model.load_state_dict({name: tensor.to(device=device, dtype=dtype or tensor.dtype)}, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path, f"missing weights: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    # Non-persistent buffers were created on meta; recompute them on the target device.
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    return model.eval()
