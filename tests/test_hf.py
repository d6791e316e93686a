"""Hugging Face interop: round trips with equal logits, parity with transformers, token-for-token generate."""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import save_file

from common.vocab import BOS_ID, CODEBOOK_SIZE, VOCAB_SIZE
from lvm.checkpoint import CheckpointError, load_lvm
from lvm.export import main as export_main
from lvm.generate import GREEDY, Decoder
from lvm.hf import config_from_hf, config_to_hf, hf_name, save_hf
from lvm.model import LVM, LVMConfig

transformers = pytest.importorskip("transformers")

TINY = dict(dim=64, mlp_dim=96, n_layers=2, n_heads=4, max_seq_len=128)


def save_ckpt(model: LVM, path) -> None:
    """A checkpoint in the training contract's shape: Lightning `state_dict` with `model.*` + `lvm_config`."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lvm_config": model.cfg.to_dict(), "epoch": 0}, path)


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    model = LVM(LVMConfig(**TINY)).eval()
    with torch.no_grad():  # non-trivial norms, so a mixed-up norm weight would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    save_ckpt(ours, out / "last.ckpt")
    export_main(["--model", str(out / "last.ckpt"), "--to-hf", str(out / "hf"), "--max-shard-size", "300KB"])
    return out / "hf"


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_export_writes_sharded_llama_dir(exported, tmp_path):
    assert len(list(exported.glob("*.safetensors"))) > 1
    again = shutil.copytree(exported, tmp_path / "again")  # an earlier export may be replaced (one file this time)
    export_main(["--model", str(exported.parent / "last.ckpt"), "--to-hf", str(again)])
    assert sorted(p.name for p in again.glob("*.safetensors")) == ["model.safetensors"]
    assert (exported / "model.safetensors.index.json").is_file()
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(CODEBOOK_SIZE, VOCAB_SIZE))
    assert gen["max_new_tokens"] == 256


def test_transformers_logits_equal_ours(ours, exported):
    tokens = torch.randint(0, CODEBOOK_SIZE, (2, 40))
    with torch.no_grad():
        theirs = hf_model(exported)(tokens).logits
    torch.testing.assert_close(theirs, ours(tokens), atol=1e-5, rtol=1e-4)


def test_round_trip_ours_hf_ours(ours, exported):
    back = load_lvm(exported)
    assert back.cfg == ours.cfg  # including bos_id 8192, carried by bos_token_id
    tokens = torch.randint(0, CODEBOOK_SIZE, (1, 30))
    torch.testing.assert_close(back(tokens), ours(tokens), atol=0, rtol=0)


def test_a_non_default_rope_theta_survives_checkpoint_and_export(tmp_path):
    """The miniature trains with theta 10764.66: loading must rebuild the rotary tables from the config's theta."""
    torch.manual_seed(1)
    model = LVM(LVMConfig(**{**TINY, "rope_theta": 10764.66})).eval()
    save_ckpt(model, tmp_path / "m.ckpt")
    export_main(["--model", str(tmp_path / "m.ckpt"), "--to-hf", str(tmp_path / "hf")])
    tokens = torch.randint(0, CODEBOOK_SIZE, (1, 60))
    with torch.no_grad():
        for loaded in (load_lvm(tmp_path / "m.ckpt"), load_lvm(tmp_path / "hf")):
            torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
        torch.testing.assert_close(hf_model(tmp_path / "hf")(tokens).logits, model(tokens), atol=1e-5, rtol=1e-4)


def test_transformers_model_imports_with_equal_logits(tmp_path):
    # HF -> ours: a LlamaForCausalLM made by transformers, shaped like the released LVM-7B (bos 1, pad 8192).
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB_SIZE, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=8192, tie_word_embeddings=False,
    )
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path, max_shard_size="300KB")
    model = load_lvm(tmp_path)
    assert model.cfg.bos_id is None and model.cfg.vocab_size == VOCAB_SIZE and model.cfg.max_seq_len == 128
    tokens = torch.randint(0, CODEBOOK_SIZE, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-4)


def test_pytorch_bin_shards_of_old_transformers_load(ours, exported, tmp_path):
    # transformers < 4.31 wrote pytorch_model-*.bin shards that also hold RoPE inv_freq buffers.
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    names = sorted(state)
    torch.save({k: state[k] for k in names[:10]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    rest = {k: state[k] for k in names[10:]} | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    torch.save(rest, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "config.json").write_text((exported / "config.json").read_text())
    tokens = torch.randint(0, CODEBOOK_SIZE, (1, 12))
    torch.testing.assert_close(load_lvm(tmp_path)(tokens), ours(tokens), atol=0, rtol=0)


def test_transformers_generate_equals_ours_token_for_token(ours, exported):
    prompt = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(0, CODEBOOK_SIZE, (2, 16))], 1)
    with Decoder(ours, batch_size=2, max_len=64) as decoder:
        mine = decoder.generate(prompt, 32, GREEDY)
    # generation_config.json suppresses the special ids, as our sampler does.
    hf = hf_model(exported)
    assert hf.generation_config.suppress_tokens == list(range(CODEBOOK_SIZE, VOCAB_SIZE))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    assert torch.equal(theirs[:, prompt.shape[1]:], mine)


def test_tied_head_round_trips_through_checkpoint_and_transformers(tmp_path):
    torch.manual_seed(2)
    tied = LVM(LVMConfig(**TINY, tie_embeddings=True)).eval()
    save_ckpt(tied, tmp_path / "tied.ckpt")
    back = load_lvm(tmp_path / "tied.ckpt")
    assert back.head.weight is back.embed.weight
    save_hf(back, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    again = load_lvm(tmp_path / "hf")  # the file holds the matrix once, as embed_tokens
    assert again.head.weight is again.embed.weight
    tokens = torch.randint(0, CODEBOOK_SIZE, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), tied(tokens), atol=0, rtol=0)
        torch.testing.assert_close(hf_model(tmp_path / "hf")(tokens).logits, tied(tokens), atol=1e-5, rtol=1e-4)


def test_re_exports_into_one_folder_load_the_last_and_a_killed_one_is_refused(ours, tmp_path, monkeypatch):
    """An export over an earlier one: the loader reads the new weights only (the index's files), and an export
    killed part-way leaves no config.json, so it is refused rather than read as a mix of the two models."""
    import huggingface_hub

    torch.manual_seed(3)
    other = LVM(LVMConfig(**TINY)).eval()
    save_hf(ours, tmp_path / "hf", max_shard_size="100KB")  # sharded, with an index
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    save_hf(other, tmp_path / "hf")  # one file over the shards
    assert torch.equal(load_lvm(tmp_path / "hf").head.weight, other.head.weight)
    save_hf(ours, tmp_path / "hf", max_shard_size="100KB")  # shards again, then another model's file copied in
    (tmp_path / "hf" / "model.safetensors").write_bytes(save_hf(other, tmp_path / "single").joinpath(
        "model.safetensors").read_bytes())
    assert torch.equal(load_lvm(tmp_path / "hf").head.weight, ours.head.weight)  # what the index names
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=f"^{shard}: missing: model.safetensors.index.json names it$"):
        load_lvm(tmp_path / "hf")
    (tmp_path / "moved").rename(shard)

    def killed(state, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"cut short")
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", killed)
    with pytest.raises(KeyboardInterrupt):
        save_hf(other, tmp_path / "hf")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="config.json"):
        load_lvm(tmp_path / "hf")


def test_export_takes_the_recorded_tokenizers_layout(ours, tmp_path):
    """A model trained on 64 tokens per image from 1000 codes: HF `generate` writes one image and samples only codes."""
    state = {f"model.{k}": v for k, v in ours.state_dict().items()}
    small = {"name": "small", "digest": "0" * 64, "tokens_per_image": 64, "codebook_size": 1000}
    torch.save({"state_dict": state, "lvm_config": ours.cfg.to_dict(), "tokenizer": small}, tmp_path / "small.ckpt")
    export_main(["--model", str(tmp_path / "small.ckpt"), "--to-hf", str(tmp_path / "hf")])
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 64
    assert gen["suppress_tokens"] == list(range(1000, VOCAB_SIZE))


def test_export_in_bfloat16_keeps_dtype(ours, exported, tmp_path):
    save_hf(load_lvm(exported, dtype=torch.bfloat16), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_lvm(tmp_path / "bf16").head.weight.dtype == torch.bfloat16


BASE = config_to_hf(LVMConfig(**TINY), torch.float32)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_key_value_heads": 2}, "grouped-query attention"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling"),
        ({"attention_bias": True}, "biases"),
        ({"mlp_bias": True}, "biases"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_unsupported_hf_configs_are_named(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(CheckpointError, match=f"config.json: unsupported config: {message}"):
        load_lvm(tmp_path)


@pytest.mark.parametrize(
    "config,message",
    [
        (None, "not a JSON object but NoneType"),
        ([1, 2], "not a JSON object but list"),
        ({**BASE, "hidden_size": "64"}, "LVMConfig.dim must be a positive integer, got '64'"),
        ({**BASE, "num_hidden_layers": None}, "LVMConfig.n_layers must be a positive integer, got None"),
    ],
)
def test_malformed_hf_configs_are_one_line_errors(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"config.json: {message}$"):
        load_lvm(tmp_path)


def test_a_checkpoint_whose_bos_is_outside_its_vocabulary_is_refused(tmp_path):
    """1000 codes + 100 reserved, with BOS left at 8192: every prompt's first token would index past the embedding."""
    torch.save({"state_dict": {}, "lvm_config": LVMConfig(**TINY).to_dict() | {"vocab_size": 1100}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"x.ckpt: invalid lvm_config: LVMConfig.bos_id \(8192\) must be a token "
                                              r"id below vocab_size \(1100\)$"):
        load_lvm(tmp_path / "x.ckpt")


def test_rope_theta_read_from_transformers_5_layout():
    hf = {k: v for k, v in BASE.items() if k not in ("rope_theta", "rope_scaling")}
    assert config_from_hf({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_theta == 5e5


def test_null_fields_read_as_absent_as_transformers_does():
    """transformers writes `"head_dim": null` in some configs and loads them; so must we."""
    cfg = config_from_hf({**BASE, "head_dim": None, "max_position_embeddings": None})
    assert cfg.head_dim == BASE["hidden_size"] // BASE["num_attention_heads"] and cfg.max_seq_len == 4096
    with pytest.raises(ValueError, match="head_dim 8 x 4 heads"):
        config_from_hf({**BASE, "head_dim": 8})


def test_bad_model_paths_give_one_line_errors(tmp_path, ours):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: no such file or directory"):
        load_lvm(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: corrupt or not a PyTorch checkpoint"):
        load_lvm(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an LVM training checkpoint"):
        load_lvm(tmp_path / "other.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_lvm(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors: corrupt safetensors file \(.*header too small"):
        load_lvm(tmp_path / "hf")
    state = {f"model.{k}": v for k, v in ours.state_dict().items() if k != "norm.weight"}
    torch.save({"state_dict": state, "lvm_config": ours.cfg.to_dict()}, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="partial.ckpt: missing weights: norm.weight"):
        load_lvm(tmp_path / "partial.ckpt")


def test_odd_weight_files_are_one_line_errors_saying_what_they_are(tmp_path, ours, exported):
    """Tracebacks or misleading lines for contents that are not a state dict, a swapped --tokenizer, git-lfs pointers,
    a sharded Lightning checkpoint and text read as a pickle (review 48 #2, #6, #9, #10, #13)."""
    config = (exported / "config.json").read_text()
    cases = {}
    for name, content in (("binlist", [torch.ones(2)]), ("binint", {"model.norm.weight": 3})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        torch.save(content, tmp_path / name / "pytorch_model.bin")
    cases["binlist"] = r"binlist/pytorch_model\.bin: not a state dict \(a list, not a mapping of names to tensors\)$"
    cases["binint"] = r"binint: norm\.weight: a int, not a tensor$"
    torch.save({"state_dict": [1], "lvm_config": ours.cfg.to_dict()}, tmp_path / "list.ckpt")
    cases["list.ckpt"] = r"list\.ckpt: not an LVM training checkpoint \('lvm_config' and 'state_dict' must be mappings\)$"
    torch.save({"state_dict": {}, "lvm_config": {**ours.cfg.to_dict(), "rope_theta": "x"}}, tmp_path / "theta.ckpt")
    cases["theta.ckpt"] = r"theta\.ckpt: invalid lvm_config: LVMConfig\.rope_theta must be a number, got 'x'$"
    (tmp_path / "hello.ckpt").write_text("hello world")  # text starting with "h": the unpickler's BINGET
    cases["hello.ckpt"] = r"hello\.ckpt: corrupt or not a PyTorch checkpoint \(KeyError\)$"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"format": "lvm-vqgan", "config": {}}))
    cases["tok"] = r"tok/config\.json: a VQGAN tokenizer, not a Llama model: pass it as --tokenizer$"
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "config.json").write_text(config)
    (tmp_path / "lfs" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    cases["lfs"] = r"lfs/model\.safetensors: a git-lfs pointer, not the weights: run `git lfs pull`"
    (tmp_path / "dcp.ckpt").mkdir()
    (tmp_path / "dcp.ckpt" / ".metadata").write_bytes(b"")
    (tmp_path / "dcp.ckpt" / "__0_0.distcp").write_bytes(b"")
    cases["dcp.ckpt"] = r"dcp\.ckpt: a sharded \(distributed\) Lightning checkpoint, which is not read here"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_lvm(tmp_path / name)


def test_config_numbers_and_flags_are_checked_when_loading(tmp_path, exported):
    """A string rms_norm_eps loaded and failed at the first forward pass; "false" tied the head (review 48 #5)."""
    for field, value, message in (("rms_norm_eps", "1e-6", r"LVMConfig\.norm_eps must be a number, got '1e-6'"),
                                  ("tie_word_embeddings", "false", r"tie_embeddings must be true or false, got 'false'")):
        folder = tmp_path / field
        shutil.copytree(exported, folder)
        (folder / "config.json").write_text(json.dumps({**json.loads((exported / "config.json").read_text()), field: value}))
        with pytest.raises(CheckpointError, match=message):
            load_lvm(folder)


def test_a_tokenizer_record_that_is_no_mapping_of_counts_is_one_line(tmp_path, exported, ours):
    """A hand-edited record (a string, a count written as text) was an AttributeError traceback in prompt and export,
    or a generation_config.json transformers' generate rejects (review 58 #4)."""
    for name, record in (("text", "vqgan/"), ("count", {"name": "t", "tokens_per_image": "16"})):
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        config = json.loads((exported / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "lvm_tokenizer": record}))
        with pytest.raises(CheckpointError, match=r"config.json: its tokenizer record is not a mapping of name and "
                                                  r"digest \(text\) and tokens_per_image and codebook_size"):
            load_lvm(folder)
    save_ckpt(ours, tmp_path / "list.ckpt")
    checkpoint = torch.load(tmp_path / "list.ckpt", weights_only=True)
    torch.save({**checkpoint, "tokenizer": ["a", "list"]}, tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list.ckpt: its tokenizer record is not a mapping"):
        load_lvm(tmp_path / "list.ckpt")


def test_exported_weights_are_readable_as_the_umask_lets_them_be(tiny_tokenizer, tmp_path):
    """safetensors wrote the shards 0600 whatever the umask: others could not read a model on shared storage."""
    mask = os.umask(0o027)  # the group may read, others not
    try:
        tiny_tokenizer.save(tmp_path / "tok")
        save_hf(LVM(LVMConfig(**TINY)), tmp_path / "hf", max_shard_size="300KB")
    finally:
        os.umask(mask)
    shards = [*(tmp_path / "hf").glob("*.safetensors"), tmp_path / "tok" / "model.safetensors"]
    assert len(shards) > 2 and {stat.S_IMODE(path.stat().st_mode) for path in shards} == {0o640}


def test_a_single_file_folder_reads_model_safetensors_as_transformers_does(ours, tmp_path):
    """A Meta-format `consolidated.safetensors` beside `model.safetensors` (repositories carry both) was read too and
    refused (review 48 #3)."""
    save_ckpt(ours, tmp_path / "last.ckpt")
    export_main(["--model", str(tmp_path / "last.ckpt"), "--to-hf", str(tmp_path / "hf")])
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == ["model.safetensors"]
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "hf" / "consolidated.safetensors")
    tokens = torch.randint(0, CODEBOOK_SIZE, (1, 12))
    torch.testing.assert_close(load_lvm(tmp_path / "hf")(tokens), ours(tokens), atol=0, rtol=0)


def test_export_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'x.ckpt'}: no such file or directory\n"
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(tmp_path / "afile")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'afile'}: --to-hf exists and is not a folder\n"
    tokenizer_folder = tmp_path / "tok"
    tokenizer_folder.mkdir()
    (tokenizer_folder / "config.json").write_text('{"_class_name": "VQGANModel"}')  # open-muse's: no model_type
    with pytest.raises(SystemExit):
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(tokenizer_folder)])
    assert capsys.readouterr().err == (f"error: {tokenizer_folder}: --to-hf holds another model (config.json: model_type "
                                       "None), which the export would overwrite; give a new folder or an earlier export\n")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}')  # LVM-7B's kind
    with pytest.raises(SystemExit):
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(llama)])
    assert capsys.readouterr().err == (f"error: {llama}: --to-hf holds another model (config.json: a Llama model not "
                                       "exported by lvm.export), which the export would overwrite; give a new folder or "
                                       "an earlier export\n")
    with pytest.raises(SystemExit):
        export_main(["--model", str(tokenizer_folder), "--to-hf", f"{tokenizer_folder}/"])
    assert capsys.readouterr().err == (f"error: {tokenizer_folder}: --to-hf is the --model folder; export into another "
                                       "folder (then replace this one)\n")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(tmp_path / "o"), "--max-shard-size", "5XB"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --max-shard-size: '5XB' is not a size such as 2GB or 500MB (units: KB, MB, GB, TB)")
    with pytest.raises(SystemExit) as exit_info:  # an OverflowError traceback (review 58 #5)
        export_main(["--model", str(tmp_path / "x.ckpt"), "--to-hf", str(tmp_path / "o"), "--max-shard-size", "infGB"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --max-shard-size: 'infGB' is not a positive finite size")
