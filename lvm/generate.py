"""Generation with the model's static KV cache: prefill once, then one token per step.

`Sampling` is the next-token rule (greedy, temperature, top-k, top-p; only VQ code
ids can be drawn), `Decoder` runs a model over its KV cache and remembers what the
cache holds, so a rollout that appends frames feeds only the new tokens and
re-prefills only when the context window slides. `rollout` predicts whole frames.

Top-k/top-p are written out here (a few tensor ops) rather than taken from
`transformers`' logits processors, which would make generation depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.vocab import CODEBOOK_SIZE
from lvm.model import LVM

# The release prompted with at most 15 context frames (16-image sentences minus the target).
MAX_CONTEXT_FRAMES = 15


@dataclass(frozen=True)
class Sampling:
    """Next-token rule. Defaults are the released LVM-7B recipe (temperature 1, top-k 50, top-p 1);
    temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # written so that NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling(temperature=0.0, top_k=None)


def sample(
    logits: torch.Tensor,
    sampling: Sampling,
    num_codes: int = CODEBOOK_SIZE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token [B] from logits [B, V]. Ids >= num_codes (BOS/EOS/PAD/reserved) are never drawn."""
    logits = logits[:, :num_codes].float()
    if sampling.temperature < torch.finfo(torch.float32).tiny:  # 0, or one that rounds to 0 in float32: the limit
        return logits.argmax(-1)
    # Shifted so the largest is 0 first: a tiny temperature (1e-40) then sends the others to -inf, not all to inf.
    logits = (logits - logits.amax(-1, keepdim=True)) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < num_codes:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely one always stays.
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Decoder:
    """A model with a static KV cache of `max_len` positions for `batch_size` rows.

    `compile=True` runs the one-token decode step through `torch.compile` with
    mode "reduce-overhead" (CUDA graphs on GPU); its shapes never change, so it
    compiles once. Prefill stays eager because its length varies.
    Use as a context manager so the cache is freed.
    """

    def __init__(self, model: LVM, batch_size: int, max_len: int, compile: bool = False) -> None:
        self.model = model
        model.setup_cache(batch_size, max_len)
        # The cache lives on the model: another Decoder (or rollout) on it replaces it, and what `cached` says this
        # one holds would be wrong (it attended over the other's keys and returned other tokens, silently).
        self.caches = [block.attn.kv_cache for block in model.layers]
        self.step = torch.compile(model, mode="reduce-overhead", fullgraph=True) if compile else model
        self.cached = torch.empty(batch_size, 0, dtype=torch.long, device=model.head.weight.device)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.model.clear_cache()

    @torch.inference_mode()
    def generate(
        self,
        prompt: torch.Tensor,
        num_tokens: int,
        sampling: Sampling = GREEDY,
        num_codes: int = CODEBOOK_SIZE,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens [B, num_tokens] continuing prompt [B, T]. Only the part of the prompt that the cache
        does not already hold at the same positions is fed (always at least its last token)."""
        B, T = prompt.shape
        if num_tokens < 1 or T < 1:
            raise ValueError(f"need a prompt of at least one token and num_tokens >= 1, got {T} and {num_tokens}")
        if any(block.attn.kv_cache is not cache for block, cache in zip(self.model.layers, self.caches)):
            raise ValueError("the model's KV cache is no longer this Decoder's (another Decoder or rollout set one up, "
                             "or it was cleared): make a new Decoder")
        if B != self.cached.shape[0]:
            raise ValueError(f"prompt batch of {B} rows, but the cache was set up for {self.cached.shape[0]}")
        if T + num_tokens - 1 > self.model.cache_len:
            raise ValueError(f"prompt of {T} + {num_tokens} new tokens exceeds the cache of {self.model.cache_len}")
        start = self._reusable(prompt)
        # From here the cache no longer holds what `cached` says: an interruption (Ctrl-C, OOM) before the end
        # must not leave the next call to reuse it. Only the `start` tokens kept stay valid.
        self.cached = self.cached[:, :start]
        # All positions made on the device up front: no host-to-device copy (and sync) inside the loop.
        positions = torch.arange(T + num_tokens - 1, device=prompt.device)
        logits = self._prefill(prompt, start, positions[start:T])
        out = []
        for i in range(num_tokens):
            out.append(sample(logits, sampling, num_codes, generator))
            if i + 1 < num_tokens:
                logits = self.step(out[-1][:, None], input_pos=positions[T + i : T + i + 1])[:, -1]
        new = torch.stack(out, 1)
        self.cached = torch.cat([prompt, new[:, :-1]], 1)  # the last token was sampled, never fed
        return new

    def _prefill(self, prompt: torch.Tensor, start: int, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after the prompt, feeding it from `start`. Identical rows fed from the start (the candidates
        of one prompt) are computed once and their cache rows copied: LVM-7B's prefill of 15 frames is ~50 TFLOP."""
        if start == 0 and len(prompt) > 1:
            # On the host: a few thousand ids, and unique over rows has no kernel on every device (MPS).
            unique, rows = torch.unique(prompt.cpu(), dim=0, return_inverse=True)
            if len(unique) < len(prompt):
                rows = rows.to(prompt.device)
                logits = self.model(unique.to(prompt.device), input_pos=positions, last_only=True)[:, -1]
                for cache in self.caches:
                    cache.take_rows(rows, prompt.shape[1])
                return logits[rows]
        return self.model(prompt[:, start:], input_pos=positions, last_only=True)[:, -1]

    def _reusable(self, prompt: torch.Tensor) -> int:
        n = min(self.cached.shape[1], prompt.shape[1] - 1)
        return n if n > 0 and torch.equal(self.cached[:, :n], prompt[:, :n]) else 0


def context_frames(model: LVM, tokens_per_image: int) -> int:
    """How many context frames a prompt may hold: 15 (the release), or fewer if the model's context
    cannot fit them plus the frame being generated (and BOS when the model uses one). The target's last
    token is never an input, so BOS + (k + 1) frames may exceed the context by one token: a 4096-token
    model with BOS fits the release's 15 frames of 256 tokens."""
    return min(MAX_CONTEXT_FRAMES, (model.cfg.max_seq_len - model.cfg.prefix_len + 1) // tokens_per_image - 1)


def too_small_for_one_frame(model: LVM, tokens_per_image: int) -> str:
    """The error for a context that holds no frame at all: nearly always a tokenizer that is not the model's."""
    return (f"the model's context of {model.cfg.max_seq_len} tokens cannot hold one context frame and the frame to "
            f"generate ({tokens_per_image} tokens per image): is this the model's tokenizer?")


def rollout_cache_len(model: LVM, tokens_per_image: int) -> int:
    """Positions the KV cache of a rollout holds: BOS (when the model uses one), the context frames and the
    frame being generated, but for its last token."""
    return model.cfg.prefix_len + (context_frames(model, tokens_per_image) + 1) * tokens_per_image - 1


def rollout(
    model: LVM,
    frames: torch.Tensor,
    num_frames: int,
    sampling: Sampling = GREEDY,
    num_codes: int = CODEBOOK_SIZE,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Predict `num_frames` frames after frames [B, F, T]: each is generated from the last
    `context_frames` frames (prefixed with BOS when the model uses one). Returns [B, num_frames, T]."""
    B, F, T = frames.shape
    window = context_frames(model, T)
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if window < 1:
        raise ValueError(too_small_for_one_frame(model, T))
    if F > window:
        raise ValueError(f"{F} context frames given; the model's context fits at most {window}")
    if num_frames == 0:
        return frames[:, F:]
    # The cache holds what the longest prompt of this rollout needs, not the whole context: each decode step reads
    # all of it (a one-frame prompt to LVM-7B: 0.37 GiB a row, not 2 GiB; 1.6x faster per token on a CPU).
    longest = model.cfg.prefix_len + (min(F + num_frames - 1, window) + 1) * T - 1
    with Decoder(model, B, min(longest, rollout_cache_len(model, T)), compile=compile) as decoder:
        for _ in range(num_frames):
            prompt = model.with_bos(frames[:, -window:].reshape(B, -1))
            new = decoder.generate(prompt, T, sampling, num_codes, generator)
            frames = torch.cat([frames, new[:, None]], 1)
    return frames[:, F:]
