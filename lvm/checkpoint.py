"""One loader for every model file a user brings: `load_lvm(path) -> LVM`.

- our Lightning checkpoints (`*.ckpt`): `state_dict` keys `model.*` and
  `checkpoint["lvm_config"]` (an `LVMConfig.to_dict()`);
- Hugging Face `LlamaForCausalLM` directories (config.json + safetensors or
  `pytorch_model*.bin` shards), such as the released LVM-7B;
- a Hugging Face hub id of such a directory (`Emma02/LVM_ckpts`, optionally `@revision`), fetched into the
  hub cache by `weights.resolve` (a `.ckpt` on the hub: `hf download REPO FILE`, then its path).

Weights are data: pickles are read with `torch.load(weights_only=True)` (`weights.torch_load`), so a
checkpoint that pickles code is refused with the global it names, and nothing in it runs.

A model knows its tokenizer: `model.tokenizer_info` is what it was trained on (`VQTokenizer.identity()`:
name, digest, tokens per image, codebook size), carried from the token shards through the sentence shards
into `checkpoint["tokenizer"]` and the HF config's `lvm_tokenizer`; None when unknown. `check_tokenizer`
warns in one line when a command is given another one.

Both paths build the model on the meta device and assign the stored tensors
(`load_state_dict(assign=True)`), so no random initialisation runs and peak
memory stays near the model's size; HF shards are streamed one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import weights
from common.errors import UserError, warn
from common.vocab import CODEBOOK_SIZE, NUM_RESERVED
from lvm import hf
from lvm.model import LVM, LVMConfig, rope_tables
from sentences.formats import other_tokenizer


class CheckpointError(UserError):
    """A model file or directory that cannot be loaded: `CheckpointError(path, problem)`."""


def check_codebook(model: LVM, codebook_size: int, tokenizer_path: str | Path) -> None:
    """A tokenizer's codes must be among the model's code ids (its vocabulary minus the reserved ids); every command
    that pairs a model with a tokenizer checks it.

    A smaller codebook (the miniature's 1000 FSQ codes) uses the first ids and keeps the special ids where
    every LVM has them (BOS 8192); the ids above it are never sampled (`sample(num_codes=...)`)."""
    codes = model.cfg.vocab_size - NUM_RESERVED
    if codebook_size > codes:
        raise CheckpointError(
            tokenizer_path,
            f"codebook of {codebook_size} codes does not fit the model's {codes} code ids "
            f"(vocabulary {model.cfg.vocab_size} = codes + {NUM_RESERVED} reserved)",
        )


RELEASED_TOKENIZER = {"name": weights.DEFAULT_TOKENIZER, "digest": None, "tokens_per_image": 256,
                      "codebook_size": CODEBOOK_SIZE}
"""What the released LVM-7B (`weights.DEFAULT_MODEL`) was trained on: the released tokenizer, 256 tokens per
image from 8192 codes. Its digest needs the weights (`tokenizer.load(weights.DEFAULT_TOKENIZER).digest()`);
until it is filled in, that tokenizer is recognised by its hub id and its shape."""


def trained_layout(model: LVM) -> tuple[int, int]:
    """(tokens per image, codebook size) of the tokenizer `model` records, each the release's (256, 8192)
    where it records none: what a command without a tokenizer of its own must assume."""
    info = getattr(model, "tokenizer_info", None) or {}
    return (
        info.get("tokens_per_image") or RELEASED_TOKENIZER["tokens_per_image"],
        info.get("codebook_size") or RELEASED_TOKENIZER["codebook_size"],
    )


def load_lvm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LVM:
    """Load an LVM in eval mode from our `.ckpt`, an HF Llama directory or a hub id; `dtype` None keeps the
    stored one. `model.tokenizer_info` says which tokenizer it was trained on (None when unknown)."""
    try:
        resolved = weights.resolve(path, option="--model")
    except weights.WeightsError as err:
        raise CheckpointError(err.where, err.what) from None
    if resolved.is_dir():
        if (resolved / ".metadata").is_file() and any(resolved.glob("*.distcp")):
            raise CheckpointError(resolved, "a sharded (distributed) Lightning checkpoint, which is not read here: resume "
                                            "it with --ckpt_path and save with save_distributed_checkpoint false for "
                                            "one .ckpt (docs/training.md)")
        if not (resolved / "config.json").is_file():
            raise CheckpointError(resolved, "not a Hugging Face model directory (no config.json)")
        cfg, tensors, info = _hf_source(resolved, released=_is_released(path))
    else:
        cfg, tensors, info = _lightning_source(resolved)
    model = _materialize(resolved, cfg, tensors, torch.device(device), dtype)
    model.tokenizer_info = info
    return model


def _is_released(spec: str | Path) -> bool:
    hub = weights.hub_repo(spec)
    return hub is not None and hub[0] == weights.DEFAULT_MODEL


def _lightning_source(path: Path) -> tuple[LVMConfig, Iterator[tuple[str, torch.Tensor]], dict | None]:
    # mmap keeps tensors on disk until they are assigned.
    try:
        ckpt = weights.torch_load(path, mmap=True)
    except weights.WeightsError as err:
        raise CheckpointError(path, err.what) from None
    if not isinstance(ckpt, dict) or "lvm_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(path, "not an LVM training checkpoint (no 'lvm_config' / 'state_dict')")
    if not isinstance(ckpt["lvm_config"], dict) or not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(path, "not an LVM training checkpoint ('lvm_config' and 'state_dict' must be mappings)")
    try:
        cfg = LVMConfig.from_dict(ckpt["lvm_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid lvm_config: {e}") from e
    tensors = ((k.removeprefix("model."), v) for k, v in ckpt["state_dict"].items() if k.startswith("model."))
    return cfg, tensors, _tokenizer_record(ckpt.get("tokenizer"), path)


def _hf_source(path: Path, released: bool) -> tuple[LVMConfig, Iterator[tuple[str, torch.Tensor]], dict | None]:
    try:
        config = json.loads((path / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError(f"not a JSON object but {type(config).__name__}")
        if config.get("format") == "lvm-vqgan" or config.get("_class_name") == "VQGANModel":  # the flags swapped
            raise ValueError("a VQGAN tokenizer, not a Llama model: pass it as --tokenizer")
        cfg = hf.config_from_hf(config)
    except (ValueError, KeyError, TypeError) as e:
        problem = f"missing config field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(path / "config.json", problem) from e
    shards = _weight_files(path)
    if not shards:
        raise CheckpointError(path, "no *.safetensors or pytorch_model*.bin weight files")
    info = config.get(hf.TOKENIZER_KEY) or (RELEASED_TOKENIZER if released or hf.is_released(config) else None)
    return cfg, _hf_tensors(shards), _tokenizer_record(info, path / "config.json")


def _tokenizer_record(record: object, path: Path) -> dict | None:
    """The record of the tokenizer a model was trained on, checked where it is read: every command compares it with
    the tokenizer it is given and export writes its counts into generation_config.json, so a hand edit that made it
    a string (or a count a string) was an AttributeError traceback, or a config transformers' generate rejects."""
    if record is None:
        return None
    counts_ok = isinstance(record, dict) and all(
        record.get(key) is None or (isinstance(record[key], int) and not isinstance(record[key], bool) and record[key] > 0)
        for key in ("tokens_per_image", "codebook_size"))
    names_ok = isinstance(record, dict) and all(record.get(key) is None or isinstance(record[key], str)
                                                for key in ("name", "digest"))
    if not (counts_ok and names_ok):
        raise CheckpointError(path, f"its tokenizer record is not a mapping of name and digest (text) and "
                                    f"tokens_per_image and codebook_size (positive integers): {str(record)[:200]}")
    return record


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder as transformers reads them: those its index names when it has one, else
    `model.safetensors`, else `pytorch_model.bin` (other files beside them, a copied-in or Meta-format
    `consolidated.safetensors`, are not this model's); a folder with none of these: its safetensors or .bin files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                names = json.loads((path / index).read_text())["weight_map"].values()
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(path / index, f"not a weight index ({type(e).__name__}: {e})") from None
            files = sorted({path / name for name in names})
            for file in files:
                if not file.is_file():
                    raise CheckpointError(file, f"missing: {index} names it")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))


def _hf_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) one at a time, one shard open at a time."""
    for shard in shards:
        if shard.suffix == ".safetensors":
            try:
                with safe_open(shard, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        if (name := _our_name(shard, key)) is not None:
                            yield name, f.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(shard, weights.LFS_POINTER if weights.is_lfs_pointer(shard) else
                                      f"corrupt safetensors file ({err})") from None
        else:
            try:
                state = weights.torch_load(shard, mmap=True)
            except weights.WeightsError as err:
                raise CheckpointError(shard, err.what) from None
            if not isinstance(state, dict):
                raise CheckpointError(shard, f"not a state dict (a {type(state).__name__}, not a mapping of names to tensors)")
            for key, tensor in state.items():
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
    if cfg.tie_embeddings:
        expected.pop("head.weight")  # the embedding's tensor; files may carry a copy, which is not needed
    for name, tensor in tensors:
        if cfg.tie_embeddings and name == "head.weight":
            continue
        if name not in expected:
            raise CheckpointError(path, f"unexpected weight {name!r} for this config")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(path, f"{name}: a {type(tensor).__name__}, not a tensor")
        if tensor.shape != expected[name].shape:
            want = tuple(expected[name].shape)
            raise CheckpointError(path, f"{name}: shape {tuple(tensor.shape)} != {want} expected from the config")
        # assign=True adopts the (converted) tensor instead of copying into a meta one.
        model.load_state_dict({name: tensor.to(device=device, dtype=dtype or tensor.dtype)}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path, f"missing weights: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    # Non-persistent buffers were created on meta; recompute them on the target device.
    model.rope_cos, model.rope_sin = (t.to(device) for t in rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    return model.eval()


def describe(info: dict) -> str:
    """`name (digest 1a2b3c4d..., 256 tokens per image, 8192 codes)` with the parts that are known."""
    parts = [f"digest {info['digest'][:12]}" if info.get("digest") else None,
             f"{info['tokens_per_image']} tokens per image" if info.get("tokens_per_image") else None,
             f"{info['codebook_size']} codes" if info.get("codebook_size") else None]
    return f"{info.get('name') or 'unnamed'} ({', '.join(p for p in parts if p)})"


def tokenizer_mismatch(trained: dict | None, given: dict) -> bool:
    """Whether the tokenizer `given` (`VQTokenizer.identity(name)`) is not the one a model was `trained` on:
    by digest when the model records one, else by hub id, else by tokens per image and codebook size."""
    if not trained:
        return False
    if trained.get("digest"):
        return other_tokenizer(trained, given)
    trained_hub, given_hub = (weights.hub_repo(i["name"]) if i.get("name") else None for i in (trained, given))
    if trained_hub and given_hub:
        return trained_hub[0] != given_hub[0]
    return any(trained.get(k) not in (None, given[k]) for k in ("tokens_per_image", "codebook_size"))


def check_tokenizer(model: LVM, model_name: str | Path, given: dict) -> bool:
    """Warn in one line (stderr) when `given` is not the tokenizer `model` was trained on; True if it warned."""
    trained = getattr(model, "tokenizer_info", None)
    if not tokenizer_mismatch(trained, given):
        return False
    warn(f"tokenizer {describe(given)} is not the one {model_name} was trained on, {describe(trained)}: "
         "its predictions will be noise; pass that tokenizer with --tokenizer")
    return True
