"""The LVM model: sizes, shapes, causality, KV cache and document masking."""

import re
from pathlib import Path

import pytest
import torch

from common.vocab import VOCAB_SIZE
from lvm.model import LVM, LVMConfig

# Parameter counts of the paper's sizes (Bai et al., 2023, Table 1) and the released LVM-7B, within 0.5%.
EXPECTED_PARAMS = {"300m": 291e6, "600m": 648e6, "1b": 1147e6, "3b": 3275e6, "7b": 6544e6}


@pytest.mark.parametrize("name,expected", EXPECTED_PARAMS.items())
def test_named_sizes_have_paper_parameter_counts(name, expected):
    cfg = LVMConfig.from_name(name)
    assert cfg.vocab_size == VOCAB_SIZE == 8292
    assert abs(cfg.num_params() - expected) / expected < 0.005
    with torch.device("meta"):  # counts the real modules without allocating them
        model = LVM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


ROOT = Path(__file__).resolve().parents[1]


def _millions(text: str) -> tuple[float, int]:
    """'2.9M' / '1,147M' / '3275M' -> (value in millions, decimals shown)."""
    number = re.match(r"([\d,]+(?:\.(\d+))?)M", text.strip())
    assert number, text
    return float(number[1].replace(",", "")), len(number[2] or "")


def test_docs_size_tables_match_the_model():
    """README's size table and docs/training.md's config table, row by row, against LVMConfig."""
    readme = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.,]+M)", (ROOT / "README.md").read_text(), re.M)
    assert {row[0] for row in readme} == {"tiny", "300m", "600m", "1b", "3b", "7b"}
    configs = re.findall(r"^\| `lvm_(\w+)\.yaml` \| (\d+)/(\d+)/(\d+)/(\d+)[^|]*\| ([\d.,]+M)",
                         (ROOT / "docs" / "training.md").read_text(), re.M)
    assert {row[0] for row in configs} == {"tiny", "300m", "600m", "1b", "3b"}
    for name, dim, mlp_dim, n_layers, n_heads, params in readme + configs:
        cfg = LVMConfig.from_name(name)
        assert (cfg.dim, cfg.mlp_dim, cfg.n_layers, cfg.n_heads) == tuple(map(int, (dim, mlp_dim, n_layers, n_heads))), name
        value, decimals = _millions(params)
        assert value == round(cfg.num_params() / 1e6, decimals), (name, params, cfg.num_params())
    for name in ("tiny", "300m", "600m", "1b", "3b"):  # each config's first line states its size
        first_line = (ROOT / "configs" / f"lvm_{name}.yaml").read_text().splitlines()[0]
        value, decimals = _millions(re.search(r"([\d.,]+M) parameters", first_line)[1])
        assert value == round(LVMConfig.from_name(name).num_params() / 1e6, decimals), (name, first_line)


def test_flops_per_token_match_reference():
    # 6N + attention: ~2.9 GFLOP (300M) and ~9.1 GFLOP (1B) per training token at seq 4096.
    assert LVMConfig.from_name("300m").flops_per_token(4096) / 1e9 == pytest.approx(2.9, abs=0.1)
    assert LVMConfig.from_name("1b").flops_per_token(4096) / 1e9 == pytest.approx(9.1, abs=0.1)


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="LVMConfig.dim"):
        LVMConfig(dim=130, n_heads=4)
    with pytest.raises(ValueError, match="unknown LVM size 'huge'"):
        LVMConfig.from_name("huge")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LVM(LVMConfig(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=64)).eval()


def test_forward_shape(model):
    tokens = torch.randint(0, 8192, (2, 10))
    assert model(tokens).shape == (2, 10, VOCAB_SIZE)


def test_future_tokens_never_change_earlier_logits(model):
    tokens = torch.randint(0, 8192, (1, 16))
    changed = tokens.clone()
    changed[0, 9:] = torch.randint(0, 8192, (7,))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_the_whole_context_is_usable(model):
    """A row of exactly max_seq_len tokens runs, and its first tokens' logits are those of a shorter row."""
    tokens = torch.randint(0, 8192, (1, model.cfg.max_seq_len))
    full = model(tokens)
    assert full.shape == (1, model.cfg.max_seq_len, VOCAB_SIZE)
    torch.testing.assert_close(full[:, :-1], model(tokens[:, :-1]), atol=1e-5, rtol=1e-4)


def test_kv_cache_prefill_and_decode_equal_full_forward(model):
    tokens = torch.randint(0, 8192, (2, 20))
    full = model(tokens)
    model.setup_cache(batch_size=2, max_len=32)
    try:
        prefill = model(tokens[:, :12], input_pos=torch.arange(12))
        steps = [model(tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(12, 20)]
    finally:
        model.clear_cache()
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 12:], atol=1e-5, rtol=1e-4)


def test_document_mask_isolates_packed_sentences(model):
    # RoPE is relative, so a sentence packed after another scores exactly as it does alone.
    first, second = torch.randint(0, 8192, (1, 7)), torch.randint(0, 8192, (1, 9))
    packed = torch.cat([first, second], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    out = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :7], model(first), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 7:], model(second), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(packed)[:, 7:], model(second), atol=1e-3)


def test_errors_are_clear(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))
    model.setup_cache(1, 8)
    try:
        with pytest.raises(ValueError, match="doc_ids with a KV cache"):  # would be ignored: the cache has no sentences
            model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2), doc_ids=torch.zeros(1, 2))
    finally:
        model.clear_cache()


def test_bos_is_prepended_only_by_models_that_use_one(model):
    tokens = torch.tensor([[5, 6, 7]])
    assert model.with_bos(tokens).tolist() == [[model.cfg.bos_id, 5, 6, 7]] and model.cfg.prefix_len == 1
    released = LVM(LVMConfig(**{**model.cfg.to_dict(), "bos_id": None}))
    assert released.with_bos(tokens).tolist() == [[5, 6, 7]] and released.cfg.prefix_len == 0


def test_tied_head_shares_the_embedding_and_counts_once():
    cfg = LVMConfig(tie_embeddings=True)
    model = LVM(cfg)
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params() == LVMConfig().num_params() - VOCAB_SIZE * 128
    model(torch.randint(0, 100, (1, 8))).logsumexp(-1).sum().backward()
    assert model.embed.weight.grad[200:].abs().sum() > 0  # rows of unseen codes learn through the head


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = LVM(LVMConfig(dim=256, mlp_dim=512, n_layers=8, n_heads=4, max_seq_len=16))
    q_std = model.layers[0].attn.q_proj.weight.std().item()
    o_std = model.layers[0].attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_last_only_gives_the_last_positions_logits_alone():
    """A prefill keeps only the last position: the head over every position was memory spent for nothing."""
    torch.manual_seed(0)
    model = LVM(LVMConfig(dim=32, mlp_dim=64, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    tokens = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        last = model(tokens, last_only=True)
        assert last.shape == (2, 1, model.cfg.vocab_size)
        torch.testing.assert_close(last, model(tokens)[:, -1:], rtol=1e-5, atol=1e-5)  # BLAS may round M=1 otherwise
