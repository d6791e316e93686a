"""The Hugging Face Llama format: config and weight-name mapping both ways, and export.

Our module names mirror `LlamaForCausalLM` and our RoPE uses its half-split
layout, so converting is a key rename and a config translation: no reshaping,
no q/k permutation. Reading HF directories (streamed shard by shard) lives in
`lvm.checkpoint`; writing them is `save_hf` here, behind `python -m lvm.export`.

Exported configs are written by hand rather than through `transformers.LlamaConfig`
so that exporting needs no `transformers`, and so the files use the keys both
transformers 4.x (`rope_theta`) and 5.x read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from common.files import atomic_write, umask_mode
from common.vocab import CODEBOOK_SIZE, EOS_ID, PAD_ID
from lvm.model import LVM, LVMConfig

# (our name, HF name) for every weight; `{i}` is the layer index.
_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
]
_LAYER = re.compile(r"\.(\d+)\.")
# Checkpoints from transformers < 4.31 also stored RoPE frequencies; we recompute them.
_IGNORED_HF = re.compile(r".*\.rotary_emb\.inv_freq$")
_TO_HF = {ours: hf for ours, hf in _NAMES}
TOKENIZER_KEY = "lvm_tokenizer"
"""config.json entry recording the tokenizer the model was trained on (`VQTokenizer.identity()`)."""
_FROM_HF = {hf: ours for ours, hf in _NAMES}


def _rename(name: str, table: dict[str, str]) -> str | None:
    match = _LAYER.search(name)
    template = _LAYER.sub(".{i}.", name, count=1) if match else name
    target = table.get(template)
    if target is None:
        return None
    return target.format(i=match.group(1)) if match else target


def hf_name(ours: str) -> str:
    """HF weight name for one of our parameter names."""
    name = _rename(ours, _TO_HF)
    if name is None:
        raise KeyError(f"no Hugging Face name for parameter {ours!r}")
    return name


def our_name(hf: str) -> str | None:
    """Our parameter name for an HF weight name; None for weights we deliberately skip."""
    if _IGNORED_HF.match(hf):
        return None
    name = _rename(hf, _FROM_HF)
    if name is None:
        raise KeyError(f"unexpected weight {hf!r} in a LlamaForCausalLM checkpoint")
    return name


def _rope_theta(hf: dict) -> float:
    """RoPE base from either config generation; reject any RoPE scaling, which we do not implement."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling or rope_type != "default":
        raise ValueError(f"unsupported config: RoPE scaling {scaling or params} (only plain RoPE is implemented)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _field(hf: dict, name: str, default: object) -> object:
    """A config field, null read as absent (as transformers writes some fields)."""
    value = hf.get(name)
    return default if value is None else value


def config_from_hf(hf: dict) -> LVMConfig:
    """Translate a Llama config.json into an LVMConfig; ValueError names what we cannot represent.

    BOS: a model exported by us declares `bos_token_id` 8192 (a special id) and is
    prompted with it; the released LVM-7B declares 1, a code id it never used, so
    it gets `bos_id=None` and is prompted without BOS, as its own inference code does.
    """
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported config: model_type {hf.get('model_type')!r} (expected 'llama')")
    bos, vocab = hf.get("bos_token_id"), hf["vocab_size"]
    cfg = LVMConfig(  # checks the shape's types and sizes first, so the checks below compare numbers
        dim=hf["hidden_size"],
        mlp_dim=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        vocab_size=vocab,
        max_seq_len=hf.get("max_position_embeddings") or 4096,  # null, as transformers writes some fields, = absent
        rope_theta=_rope_theta(hf),
        norm_eps=_field(hf, "rms_norm_eps", 1e-6),
        init_std=_field(hf, "initializer_range", 0.02),
        tie_embeddings=_field(hf, "tie_word_embeddings", False),  # checked as a bool: "false" is no False
        bos_id=bos if isinstance(bos, int) and isinstance(vocab, int) and CODEBOOK_SIZE <= bos < vocab else None,
    )
    kv_heads, heads = hf.get("num_key_value_heads"), cfg.n_heads
    checks = [
        (kv_heads not in (None, heads), f"grouped-query attention ({kv_heads} key/value heads for {heads} heads)"),
        (hf.get("attention_bias", False) or hf.get("mlp_bias", False), "biases (attention_bias/mlp_bias true)"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} (expected 'silu')"),
        (hf.get("head_dim") not in (None, cfg.head_dim), f"head_dim {hf.get('head_dim')} x {heads} heads != {cfg.dim}"),
    ]
    for failed, what in checks:
        if failed:
            raise ValueError(f"unsupported config: {what}")
    return cfg


def is_released(hf: dict) -> bool:
    """Whether a Llama config.json is the released LVM-7B's (its shape, and the BOS 1 no export of ours writes)."""
    shape = (hf.get("hidden_size"), hf.get("num_hidden_layers"), hf.get("vocab_size"), hf.get("bos_token_id"))
    return TOKENIZER_KEY not in hf and shape == (4096, 32, 8292, 1)


def config_to_hf(cfg: LVMConfig, dtype: torch.dtype, tokenizer: dict | None = None) -> dict:
    """config.json of an equivalent LlamaForCausalLM; `tokenizer` (the one it was trained on) rides along as
    `lvm_tokenizer`, an extra key transformers keeps and ignores."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        **({TOKENIZER_KEY: tokenizer} if tokenizer else {}),
    }


def generation_config(cfg: LVMConfig, tokens_per_image: int | None, codebook_size: int = CODEBOOK_SIZE) -> dict:
    """generation_config.json carrying our sampling recipe, so `model.generate` behaves like `lvm.prompt`:
    every id outside the tokenizer's codebook is suppressed (only its codes are sampled) and the defaults are
    the release's."""
    out = {
        "bos_token_id": cfg.bos_id,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "suppress_tokens": list(range(codebook_size, cfg.vocab_size)),
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    if tokens_per_image:
        out["max_new_tokens"] = tokens_per_image
    return out


def save_hf(
    model: LVM,
    out_dir: str | Path,
    tokens_per_image: int | None = None,
    max_shard_size: int | str = "5GB",
    codebook_size: int = CODEBOOK_SIZE,
) -> Path:
    """Write `model` as a LlamaForCausalLM directory (config.json, generation_config.json, safetensors shards), in
    the model's dtype (load it in the dtype to write: `lvm.export --dtype`)."""
    from huggingface_hub import save_torch_state_dict  # sharding + index file, as `save_pretrained` writes them

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model.head.weight.dtype
    # A tied head is written once, as the embedding (what transformers saves and expects with tie_word_embeddings).
    state = {hf_name(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "head.weight")}
    # The configs go first and come back last, each written whole: a folder without config.json is no model to any
    # loader, so an export killed part-way is refused, never read as a mix of an earlier export's weights and these.
    for name in ("config.json", "generation_config.json"):
        (out / name).unlink(missing_ok=True)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, safe_serialization=True)  # drops older shards
    umask_mode(*out.glob("*.safetensors"))
    config = config_to_hf(model.cfg, dtype, getattr(model, "tokenizer_info", None))
    gen = generation_config(model.cfg, tokens_per_image, codebook_size)
    for name, content in (("generation_config.json", gen), ("config.json", config)):
        with atomic_write(out / name, "w") as file:
            file.write(json.dumps(content, indent=2) + "\n")
    return out
