"""KV-cache generation equals full recomputation; the sampler only draws codes and honours top-k/top-p."""

import copy

import pytest
import torch

from common.vocab import BOS_ID, CODEBOOK_SIZE
from lvm.generate import GREEDY, Decoder, Sampling, context_frames, rollout, sample
from lvm.model import LVM, KVCache, LVMConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LVM(LVMConfig(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=96)).eval()


@torch.no_grad()
def recompute(model: LVM, prompt: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Greedy decoding the slow way: a full forward over the whole sequence for every token."""
    seq = prompt
    for _ in range(num_tokens):
        nxt = model(seq)[:, -1, :CODEBOOK_SIZE].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[:, prompt.shape[1]:]


def test_cached_greedy_equals_recomputation(model):
    prompt = torch.randint(0, CODEBOOK_SIZE, (2, 20))
    with Decoder(model, batch_size=2, max_len=64) as decoder:
        cached = decoder.generate(prompt, 40)
    assert torch.equal(cached, recompute(model, prompt, 40))
    assert model.cache_len == 0  # the context manager freed the cache


def test_rollout_with_sliding_window_equals_recomputation(model):
    # 8 tokens per "frame": 96-token context fits BOS + 11 frames + all but the last token of the
    # generated one (1 + 88 + 7 = 96) -> window 11.
    T = 8
    assert context_frames(model, T) == 11
    frames = torch.randint(0, CODEBOOK_SIZE, (2, 9, T))
    out = rollout(model, frames, num_frames=4, sampling=GREEDY)
    expected, seq = [], frames
    for _ in range(4):
        prompt = torch.cat([torch.full((2, 1), BOS_ID), seq[:, -11:].reshape(2, -1)], 1)
        expected.append(recompute(model, prompt, T))
        seq = torch.cat([seq, expected[-1][:, None]], 1)
    assert torch.equal(out, torch.stack(expected, 1))


def test_decoder_feeds_only_new_tokens(model):
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    try:
        prompt = torch.randint(0, CODEBOOK_SIZE, (1, 10))
        with Decoder(model, 1, 64) as decoder:
            first = decoder.generate(prompt, 5)
            decoder.generate(torch.cat([prompt, first, first], 1), 3)  # extends what the cache holds
            decoder.generate(prompt[:, 1:], 2)  # a different prefix: prefill from scratch
    finally:
        hook.remove()
    # prefill 10 + 4 steps; then the unfed last token + 5 new = 6, + 2 steps; then 9 + 1 step.
    assert fed == [10, 1, 1, 1, 1, 6, 1, 1, 9, 1]


def test_identical_rows_are_prefilled_once_and_decode_as_if_each_were(model):
    """The candidates of one prompt share their prefill (once per distinct row, its cache rows copied)."""
    a, b = torch.randint(0, CODEBOOK_SIZE, (2, 1, 20))
    prompt = torch.cat([a, b, a, a])
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args: fed.append(tuple(args[0].shape)))
    try:
        with Decoder(model, batch_size=4, max_len=64) as decoder:
            cached = decoder.generate(prompt, 30)
    finally:
        hook.remove()
    assert fed[0] == (2, 20) and set(fed[1:]) == {(4, 1)}
    assert torch.equal(cached, recompute(model, prompt, 30))
    cache = KVCache(3, 8, 1, 2, torch.float32, "cpu")
    cache.k.copy_(torch.arange(48.0).view(3, 1, 8, 2))
    cache.take_rows(torch.tensor([2, 2, 0]), 5)  # the prompt's 5 positions only: the rest is not worth copying
    assert cache.k[:, 0, :5].tolist() == [[[32.0 + i, 33.0 + i] for i in range(0, 10, 2)]] * 2 + [[[i, i + 1.0] for i in range(0, 10, 2)]]
    assert torch.equal(cache.k[:, :, 5:], torch.arange(48.0).view(3, 1, 8, 2)[:, :, 5:])


def test_a_rollout_from_no_frames_starts_after_bos_and_zero_frames_are_none(model):
    """BOS alone was dropped (an "empty prompt"), and 0 frames without BOS asked for a cache of -1 (review 60 #4, #5)."""
    nothing = torch.empty(2, 0, 8, dtype=torch.long)
    assert model.with_bos(torch.empty(2, 0, dtype=torch.long)).tolist() == [[BOS_ID], [BOS_ID]]
    first = rollout(model, nothing, num_frames=1)
    assert torch.equal(first[:, 0], recompute(model, torch.full((2, 1), BOS_ID), 8))
    no_bos = copy.deepcopy(model)
    no_bos.cfg.bos_id = None
    assert rollout(no_bos, nothing, num_frames=0).shape == (2, 0, 8)


def test_a_decoder_whose_cache_another_replaced_says_so(model):
    """The cache lives on the model: a second Decoder replaced it, and the first reused what it thought it held,
    returning other tokens without a word (review 58 #1)."""
    prompt, other = torch.randint(0, CODEBOOK_SIZE, (2, 1, 10))
    first = Decoder(model, 1, 64)
    tokens = first.generate(prompt, 5)
    with Decoder(model, 1, 64) as second:
        second.generate(other, 5)
    with pytest.raises(ValueError, match="the model's KV cache is no longer this Decoder's"):
        first.generate(torch.cat([prompt, tokens], 1), 5)


def test_a_rollout_caches_what_its_longest_prompt_needs(model, monkeypatch):
    """The cache was the whole context for any prompt, and every decode step reads all of it: 2 GiB a row for
    LVM-7B where a one-frame prompt needs 0.37 (review 58 #3). The tokens are those of the full cache."""
    sizes, setup = [], LVM.setup_cache
    monkeypatch.setattr(LVM, "setup_cache", lambda self, b, n: (sizes.append(n), setup(self, b, n))[1])
    frames = torch.randint(0, CODEBOOK_SIZE, (2, 2, 8))
    short = rollout(model, frames, num_frames=3)
    long = rollout(model, torch.randint(0, CODEBOOK_SIZE, (2, 11, 8)), num_frames=2)
    assert sizes == [1 + (2 + 2 + 1) * 8 - 1, 96]  # BOS + 4 frames + the last but one token; capped at the context
    expected, seq = [], frames
    for _ in range(3):
        prompt = torch.cat([torch.full((2, 1), BOS_ID), seq.reshape(2, -1)], 1)
        expected.append(recompute(model, prompt, 8))
        seq = torch.cat([seq, expected[-1][:, None]], 1)
    assert torch.equal(short, torch.stack(expected, 1)) and long.shape == (2, 2, 8)


def test_a_generate_interrupted_after_its_prefill_leaves_no_stale_cache(model, monkeypatch):
    """The cache held the interrupted prompt's keys while `cached` still described the earlier one: the next call
    reused them and returned other tokens, without an error (review 50 #2)."""
    a, b = torch.randint(0, CODEBOOK_SIZE, (2, 1, 10))
    with Decoder(model, 1, 64) as decoder:
        first = decoder.generate(a, 6)
        with monkeypatch.context() as patched:
            patched.setattr("lvm.generate.sample", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                decoder.generate(b, 6)
        assert torch.equal(decoder.generate(a, 6), first)


def test_bos_is_omitted_for_models_without_one(model):
    no_bos = LVM(LVMConfig(**{**model.cfg.to_dict(), "bos_id": None})).eval()
    no_bos.load_state_dict(model.state_dict())
    frames = torch.randint(0, CODEBOOK_SIZE, (1, 2, 8))
    assert context_frames(no_bos, 8) == 11
    assert torch.equal(rollout(no_bos, frames, 1)[:, 0], recompute(no_bos, frames.reshape(1, -1), 8))


def test_too_many_context_frames_says_how_many_fit(model):
    with pytest.raises(ValueError, match="12 context frames given; the model's context fits at most 11"):
        rollout(model, torch.zeros(1, 12, 8, dtype=torch.long), 1)


def test_bad_arguments_name_the_argument(model):
    with pytest.raises(ValueError, match="cannot hold one context frame and the frame to generate"):
        rollout(model, torch.zeros(1, 1, model.cfg.max_seq_len, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="num_frames must be >= 0, got -1"):
        rollout(model, torch.zeros(1, 1, 8, dtype=torch.long), -1)
    with Decoder(model, 1, 32) as decoder:
        for prompt, num_tokens in [(torch.zeros(1, 4, dtype=torch.long), 0), (torch.zeros(1, 0, dtype=torch.long), 2)]:
            with pytest.raises(ValueError, match="need a prompt of at least one token and num_tokens >= 1"):
                decoder.generate(prompt, num_tokens)
        with pytest.raises(ValueError, match="prompt batch of 2 rows, but the cache was set up for 1"):
            decoder.generate(torch.zeros(2, 4, dtype=torch.long), 2)


def test_only_codes_are_sampled():
    logits = torch.zeros(64, 8292)
    logits[:, CODEBOOK_SIZE:] = 100.0  # specials would win everything if allowed
    logits[:, 7] = 1.0
    assert (sample(logits, GREEDY) == 7).all()
    drawn = sample(logits, Sampling(temperature=1.0, top_k=None), generator=torch.Generator().manual_seed(0))
    assert (drawn < CODEBOOK_SIZE).all()
    assert (sample(logits, GREEDY, num_codes=5) < 5).all()


def test_top_k_and_top_p_restrict_the_candidates():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, Sampling(top_k=2), num_codes=4, generator=g)
    assert set(top2.tolist()) == {1, 2}
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> {1, 2}; top_p 0.5 -> {1}.
    assert set(sample(logits, Sampling(top_k=None, top_p=0.7), num_codes=4, generator=g).tolist()) == {1, 2}
    assert set(sample(logits, Sampling(top_k=None, top_p=0.5), num_codes=4, generator=g).tolist()) == {1}
    everything = sample(logits, Sampling(top_k=None), num_codes=4, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert (everything == 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_temperature_sharpens_as_softmax_of_logits_over_t():
    """At T = 0.5 a token drawn with probability p_i is drawn with p_i^2 / sum p^2 (0.685 for p = 0.5 here)."""
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    drawn = sample(probs.log().expand(4000, 4), Sampling(temperature=0.5, top_k=None), num_codes=4,
                   generator=torch.Generator().manual_seed(0))
    expected = (probs**2 / (probs**2).sum())[1].item()
    assert (drawn == 1).float().mean().item() == pytest.approx(expected, abs=0.03)  # T applied twice: 0.88
    nearly_greedy = sample(probs.log().expand(8, 4), Sampling(temperature=1e-40, top_k=None), num_codes=4)
    assert nearly_greedy.tolist() == [1] * 8  # logits / 1e-40 overflowed to inf, and softmax to NaN
    below_float32 = sample(probs.log().expand(8, 4), Sampling(temperature=1e-46, top_k=None), num_codes=4)
    assert below_float32.tolist() == [1] * 8  # the temperature rounded to 0 in float32: 0/0 (review 58 #2)


def test_seeded_sampling_is_reproducible_and_candidates_differ(model):
    frames = torch.randint(0, CODEBOOK_SIZE, (1, 2, 8)).expand(3, 2, 8)
    a = rollout(model, frames, 1, Sampling(), generator=torch.Generator().manual_seed(1))
    b = rollout(model, frames, 1, Sampling(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_invalid_sampling_is_rejected():
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            Sampling(temperature=temperature)


def test_compiled_decode_step_on_cpu_equals_eager(model):
    """`--compile` on a CPU: the same decode step through torch.compile (no CUDA graphs there) gives the same tokens."""
    prompt = torch.randint(0, CODEBOOK_SIZE, (2, 20), generator=torch.Generator().manual_seed(0))
    with Decoder(model, 2, 40) as decoder:
        eager = decoder.generate(prompt, 12)
    with Decoder(model, 2, 40, compile=True) as decoder:
        compiled = decoder.generate(prompt, 12)
    assert torch.equal(compiled, eager)


def test_bfloat16_decoding_on_cpu_follows_float32(model):
    """`--dtype bfloat16` on a CPU: the cache, masks and sampling work in bf16, and its logits track float32's."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    tokens = torch.randint(0, CODEBOOK_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, low = model(tokens), half(tokens).float()
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    with Decoder(half, 2, 40) as decoder:
        drawn = decoder.generate(tokens[:, :20], 12, Sampling(), generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 12) and int(drawn.max()) < CODEBOOK_SIZE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_step_on_cuda_equals_eager(model):
    """CUDA graphs through torch.compile; the CPU counterpart is test_compiled_decode_step_on_cpu_equals_eager."""
    gpu = LVM(model.cfg).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    prompt = torch.randint(0, CODEBOOK_SIZE, (2, 20), device="cuda")
    with Decoder(gpu, 2, 64) as decoder:
        eager = decoder.generate(prompt, 40)
    with Decoder(gpu, 2, 64, compile=True) as decoder:
        compiled = decoder.generate(prompt, 40)
    assert torch.equal(compiled, eager)
