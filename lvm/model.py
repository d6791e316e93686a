"""The LVM: a LLaMA-style decoder over visual tokens, in one file.

Token embedding -> pre-norm blocks (RMSNorm, rotary attention through torch's
scaled_dot_product_attention, SwiGLU MLP) -> RMSNorm -> head (untied, as in LLaMA, unless `tie_embeddings`). No biases,
no dropout by default. Module names mirror Hugging Face Llama's structure, so
import and export (`lvm.hf`) are a key rename with no reshaping.

Two optional attention modes share the one attention code path:
- a static KV cache (`setup_cache`) for generation: prefill once, then one
  token per step, with shapes that never change (friendly to torch.compile and
  CUDA graphs);
- document masking (`doc_ids`) so packed sentences cannot attend across their
  boundaries. The release trained without it; it is off unless asked for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.vocab import BOS_ID, CONTEXT_LENGTH, VOCAB_SIZE

# The paper's sizes (hidden / MLP / layers / heads), the released 7B, and a CPU-sized one.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=128, mlp_dim=352, n_layers=4, n_heads=4),
    "300m": dict(dim=1024, mlp_dim=2688, n_layers=22, n_heads=8),
    "600m": dict(dim=1536, mlp_dim=4096, n_layers=22, n_heads=16),
    "1b": dict(dim=2048, mlp_dim=5504, n_layers=22, n_heads=16),
    "3b": dict(dim=3200, mlp_dim=8640, n_layers=26, n_heads=32),
    "7b": dict(dim=4096, mlp_dim=11008, n_layers=32, n_heads=32),
}


@dataclass
class LVMConfig:
    """Shape and numerics of an LVM. `LVMConfig.from_name("1b")` gives a paper size."""

    dim: int = 128
    mlp_dim: int = 352
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = CONTEXT_LENGTH
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02
    # The head reuses the embedding matrix (GPT-2's weight tying): copying a code from an earlier frame then
    # needs one learned map rather than one per code. Off in LLaMA and the released LVM.
    tie_embeddings: bool = False
    # Prompts start with BOS for models trained on our sentences; the released
    # LVM-7B trained without one, so its import sets this to None.
    bos_id: int | None = BOS_ID

    def __post_init__(self) -> None:
        for name in ("dim", "mlp_dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LVMConfig.{name} must be a positive integer, got {value!r}")
        if self.bos_id is not None and not (isinstance(self.bos_id, int) and 0 <= self.bos_id < self.vocab_size):
            raise ValueError(f"LVMConfig.bos_id ({self.bos_id!r}) must be a token id below vocab_size ({self.vocab_size})")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LVMConfig.dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size"
            )
        for name in ("rope_theta", "norm_eps", "init_std", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"LVMConfig.{name} must be a number, got {value!r}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"LVMConfig.rope_theta, norm_eps and init_std must be > 0, got {self.rope_theta}, "
                             f"{self.norm_eps}, {self.init_std}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LVMConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LVMConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> LVMConfig:
        """A named size (SIZES), with fields overridden."""
        if name not in SIZES:
            raise ValueError(f"unknown LVM size {name!r}; choose one of {', '.join(SIZES)}")
        return cls(**{**SIZES[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> LVMConfig:
        """The config a checkpoint records; fields this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        """The fields, as checkpoints record them."""
        return asdict(self)

    @property
    def prefix_len(self) -> int:
        """Tokens before the first image of a prompt: BOS, or none for the released LVM-7B."""
        return int(self.bos_id is not None)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def residual_init_std(self) -> float:
        """Init std of the projections that write into the residual stream (o_proj, down_proj):
        scaled by 1/sqrt(2 * layers) so the stream's variance does not grow with depth (GPT-2 / Llama)."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    def num_params(self) -> int:
        """Parameter count from the shape alone (a tied head adds none)."""
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.mlp_dim + 2 * self.dim
        vocab_matrices = 1 if self.tie_embeddings else 2
        return vocab_matrices * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights plus 12 * layers * dim * seq for attention."""
        seq_len = seq_len or self.max_seq_len
        return 6.0 * self.num_params() + 12.0 * self.n_layers * self.dim * seq_len


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in Hugging Face Llama's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by position; cos/sin are [T, D] (or [B, 1, T, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Linear(nn.Linear):
    """Bias-free nn.Linear whose own reset_parameters draws N(0, std).

    Each layer carries its init (rather than one pass over the whole model) because
    FSDP materialises a model built on the meta device by calling reset_parameters()
    on every module that owns tensors, one wrapped Block at a time; eager
    construction and sharded initialisation then give the same distribution.
    """

    def __init__(self, in_features: int, out_features: int, std: float) -> None:
        self.std = std  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, std) by its own reset_parameters (see `Linear`)."""

    def __init__(self, num_embeddings: int, dim: int, std: float) -> None:
        self.std = std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class KVCache(nn.Module):
    """Static key/value cache [B, H, max_len, D]: written in place at the given positions."""

    def __init__(
        self, batch_size: int, max_len: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values [B, H, T, D] at positions `input_pos`; return the cache of those B rows. A batch of
        fewer rows than the cache (a prompt's candidates prefilled once, `take_rows` after) uses its leading rows."""
        rows = k.shape[0]
        self.k[:rows].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[:rows].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:rows], self.v[:rows]

    def take_rows(self, rows: torch.Tensor, length: int) -> None:
        """Row i's first `length` positions become a copy of row ``rows[i]``'s. Only those: indexing copies what it
        reads, and the whole cache was LVM-7B's 4096 positions of every row and layer for a 15-frame prompt."""
        self.k[:, :, :length] = self.k[rows, :, :length]
        self.v[:, :, :length] = self.v[rows, :, :length]


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, through torch's SDPA; a KV cache when one is attached."""

    def __init__(self, cfg: LVMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.q_proj = Linear(cfg.dim, cfg.dim, cfg.init_std)
        self.k_proj = Linear(cfg.dim, cfg.dim, cfg.init_std)
        self.v_proj = Linear(cfg.dim, cfg.dim, cfg.init_std)
        self.o_proj = Linear(cfg.dim, cfg.dim, cfg.residual_init_std)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LVMConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.mlp_dim, cfg.init_std)
        self.up_proj = Linear(cfg.dim, cfg.mlp_dim, cfg.init_std)
        self.down_proj = Linear(cfg.mlp_dim, cfg.dim, cfg.residual_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; the unit FSDP wraps and activation checkpointing recomputes."""

    def __init__(self, cfg: LVMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        """Pre-norm residual block: attention, then the SwiGLU MLP."""
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask, input_pos))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class LVM(nn.Module):
    """Next-token predictor over visual tokens: tokens [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg: LVMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size, cfg.init_std)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim, dtype=torch.float32), persistent=False)
        self.cache_len = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the RoPE tables, the only tensors the LVM module owns directly.

        Weights are initialised by their own layers (`Linear`, `Embedding`, RMSNorm's ones)
        when constructed, and again when FSDP materialises a meta-device model: FSDP calls
        this method on the LVM for its buffers, so it must not touch the layers' weights.
        """
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def tie_weights(self) -> None:
        """Make the head use the embedding's tensor when the config ties them (again after a load that assigned
        new tensors)."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def with_bos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N] as the model reads them: after BOS, when it uses one (the released LVM-7B does not).
        The one place prompting, scoring and probing prepend it."""
        if self.cfg.bos_id is None:
            return tokens
        bos = torch.full((tokens.shape[0], 1), self.cfg.bos_id, dtype=tokens.dtype, device=tokens.device)
        return torch.cat([bos, tokens], 1)  # full_like(tokens[:, :1]) was empty for no tokens: BOS alone was lost

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Allocate a static KV cache for generation of up to `max_len` positions, in the weights' dtype."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's context of {self.cfg.max_seq_len} tokens")
        weight = self.head.weight
        for block in self.layers:
            block.attn.kv_cache = KVCache(
                batch_size, max_len, self.cfg.n_heads, self.cfg.head_dim, weight.dtype, weight.device
            )
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None
        self.cache_len = 0

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for every position, or the last one's ([B, 1, V]) with `last_only`: a prefill keeps only that, and
        the vocabulary-wide head over every prompt position cost LVM-7B 1 GB of activations for 16 rows of 15 frames.

        tokens: [B, T] ids. input_pos: [T] absolute positions, required with a KV
        cache (prefill: arange(T); decoding: the current position). doc_ids: [B, T]
        sentence index per token; attention is then restricted to the same sentence.
        """
        T = tokens.shape[1]
        if input_pos is None:
            if self.cache_len:
                raise ValueError("input_pos is required while a KV cache is set up")
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
            input_pos = torch.arange(T, device=tokens.device)
            mask = None
            if doc_ids is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
                mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal
        else:
            if not self.cache_len:
                raise ValueError("input_pos given but no KV cache is set up; call setup_cache first")
            if doc_ids is not None:
                raise ValueError("doc_ids with a KV cache: decoding attends within one sentence, give no doc_ids")
            # Query at position p sees cached keys 0..p.
            mask = torch.arange(self.cache_len, device=tokens.device)[None, :] <= input_pos[:, None]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin, mask, input_pos if self.cache_len else None)
        return self.head(self.norm(x[:, -1:] if last_only else x))
