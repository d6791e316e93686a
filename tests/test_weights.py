"""Weights from anywhere, read as data (issue 14).

- The hub resolver on a hub cache laid out in a temporary HF_HOME (`models--org--name/refs/main` +
  `snapshots/<commit>/`) with HF_HUB_OFFLINE=1: no network is ever touched.
- The card's commands exactly as written, on tiny stand-ins of the released weights in that cache: a
  transformers `LlamaForCausalLM` as `Emma02/LVM_ckpts` and an open-muse VQGAN as `Emma02/vqvae_ckpts`.
  `--greedy` gives what transformers `generate` + open-muse's encode/decode (written out functionally here)
  give on the same weights.
- A checkpoint that pickles a shell command is refused by every reader and the command never runs.
- `lightning fit -c configs/lvm_3b.yaml` without GPUs, or without training data: one line, exit 2.
- The tokenizer's digest travels from token shards through sentence shards into the checkpoint and the HF
  config, and a reader given another tokenizer warns in one line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import tokenizer
import weights
from common.vocab import CODEBOOK_SIZE, VOCAB_SIZE
from conftest import tiny_vqgan_config
from lvm import cli as lvm_cli
from lvm import evaluate as lvm_evaluate
from lvm import export as lvm_export
from lvm import prompt as lvm_prompt
from lvm.callbacks import AtomicCheckpointIO
from lvm.checkpoint import RELEASED_TOKENIZER, CheckpointError, check_tokenizer, load_lvm
from lvm.data import LVMDataModule
from lvm.hf import TOKENIZER_KEY
from lvm.model import LVM, LVMConfig
from lvm.tokenize.pipeline import Job
from lvm.tokenize.pipeline import run as tokenize
from lvm.train import LVMModule
from sentences.build import build
from sentences.errors import SentenceError
from sentences.formats import one_tokenizer
from sentences.spec import load_spec
from test_data import write_sentence_shards
from test_tokenize import _img2dataset_shard
from test_tokenizer_loaders import TINY_MUSE_CONFIG, _reference_encode, open_muse_shapes

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The released tokenizer's format and options (no attention), tiny: 32x32 images, f=8 -> 16 tokens of 8192 codes.
MUSE = {**TINY_MUSE_CONFIG, "channel_mult": [1, 2, 2, 2], "attn_resolutions": [], "no_attn_mid_block": True,
        "num_embeddings": CODEBOOK_SIZE}
T = 16


def snapshot(home: Path, repo: str, commit: str = COMMIT) -> Path:
    """The hub cache's layout for `repo` at `commit`, which `main` points to; returns the snapshot folder."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """HF_HOME holding tiny stand-ins of the released tokenizer and LVM-7B, in their formats."""
    home = tmp_path_factory.mktemp("hf_home")
    torch.manual_seed(0)
    vq = snapshot(home, weights.DEFAULT_TOKENIZER)
    sd = {k: torch.randn(s) * (0.3 if len(s) > 1 else 0.1) for k, s in open_muse_shapes(MUSE).items()}
    (vq / "config.json").write_text(json.dumps(MUSE))
    torch.save(sd, vq / "pytorch_model.bin")
    config = transformers.LlamaConfig(  # shaped like the release: bos 1 / eos 2 are code ids, pad 8192
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=VOCAB_SIZE, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=8192, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(snapshot(home, weights.DEFAULT_MODEL))
    return home


@pytest.fixture
def offline(hub, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub


# -- the resolver ------------------------------------------------------------------------------------------
def test_the_cache_and_offline_switch_are_found_as_huggingface_hub_finds_them(offline, tmp_path, monkeypatch):
    """The older HUGGINGFACE_HUB_CACHE and TRANSFORMERS_OFFLINE, and $VARs, were ignored: a cached release was "not in
    the cache" (review 48 #1)."""
    snapshot = offline / "hub/models--Emma02--vqvae_ckpts/snapshots" / COMMIT
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("CACHE_ROOT", str(offline))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "$CACHE_ROOT/hub")
    assert weights.resolve("Emma02/vqvae_ckpts") == snapshot
    with pytest.raises(weights.WeightsError, match="HF_HUB_OFFLINE=1"):  # offline: no try at the network
        weights.resolve("someone/not-cached")


def test_hub_ids_resolve_to_cached_snapshots_and_paths_stay_paths(offline, tmp_path):
    tokenizer_snapshot = offline / "hub/models--Emma02--vqvae_ckpts/snapshots" / COMMIT
    assert weights.resolve("Emma02/vqvae_ckpts") == tokenizer_snapshot
    assert weights.resolve(f"Emma02/vqvae_ckpts@{COMMIT}") == tokenizer_snapshot
    assert weights.resolve(tmp_path) == tmp_path  # an existing path, even one shaped like org/name
    assert weights.hub_repo("Emma02/LVM_ckpts@v1") == ("Emma02/LVM_ckpts", "v1")
    assert weights.hub_repo("runs/last.ckpt") is None and weights.hub_repo("a/b/c") is None
    with pytest.raises(weights.WeightsError, match=r"^runs/last\.ckpt: no such file or directory$"):
        weights.resolve("runs/last.ckpt")
    tok = tokenizer.load("Emma02/vqvae_ckpts")
    assert (tok.tokens_per_image, tok.codebook_size) == (T, CODEBOOK_SIZE)
    model = load_lvm("Emma02/LVM_ckpts")
    assert model.cfg.bos_id is None and model.tokenizer_info == RELEASED_TOKENIZER  # the release is known


def test_a_snapshot_without_weights_says_so_and_how_to_fetch_it(offline):
    """An interrupted download leaves the json files without the weights: the error names that, not a loader's."""
    partial = snapshot(offline, "org/partial")
    (partial / "config.json").write_text("{}")
    with pytest.raises(weights.WeightsError) as info:
        weights.resolve("org/partial", "--tokenizer")
    assert str(info.value) == (f"org/partial: no *.safetensors or *.bin weight files in its Hugging Face snapshot "
                               f"({partial}): fetch it again (`hf download org/partial`) or pass a local folder: "
                               f"--tokenizer PATH")


def test_hub_fetch_prefers_safetensors_and_falls_back_to_bin(tmp_path, monkeypatch):
    """Only the weights the loaders read are fetched: safetensors when the repo has them, else the .bin pickles."""
    repos = {"owner/bin-only": ["config.json", "pytorch_model.bin"],
             "owner/both": ["config.json", "model.safetensors", "pytorch_model.bin", "original/params.json",
                            "original/consolidated.safetensors"]}  # Meta's format beside the HF one: not fetched
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None, **_):
        """The hub cache's behaviour: copy the repo's files that match `allow_patterns` into one snapshot folder."""
        calls.append((repo_id, list(allow_patterns)))
        assert not local_files_only and Path(cache_dir) == tmp_path / "cache"
        folder = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        folder.mkdir(parents=True, exist_ok=True)
        for name in repos[repo_id]:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in allow_patterns):  # as huggingface_hub matches
                (folder / name).parent.mkdir(exist_ok=True)
                (folder / name).write_text(name)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    folder = weights.resolve("owner/bin-only")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    configs = ["config.json", "generation_config.json", "preprocessor_config.json",
               "model.safetensors.index.json", "pytorch_model.bin.index.json"]
    assert calls == [("owner/bin-only", configs + ["model*.safetensors", "pytorch_model*.safetensors"]),
                     ("owner/bin-only", configs + ["pytorch_model*.bin"])]
    calls.clear()
    folder = weights.resolve("owner/both")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no pickle, no original/
    assert len(calls) == 1


def test_offline_without_a_cached_copy_is_one_line_naming_the_id_and_the_way_out(offline, tmp_path, capsys):
    with pytest.raises(CheckpointError) as info:
        load_lvm("someone/not-cached")
    message = str(info.value)
    assert message.startswith("someone/not-cached: no such local path, and as a hub id not in the Hugging Face cache")
    assert "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message and message.endswith("pass a local folder: --model PATH")
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    with pytest.raises(SystemExit) as exit_info:
        lvm_prompt.main(["--frames", str(tmp_path / "0.png"), "--tokenizer", "someone/not-cached@v2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: someone/not-cached@v2: no such local path, and as a hub id not in the Hugging Face "
                          "cache") and "--tokenizer PATH" in err
    assert "`hf download someone/not-cached --revision v2`" in err  # the revision asked for, not main


def test_evaluate_defaults_to_the_released_model_and_its_tokenizer(offline, tmp_path, capsys):
    shards = write_sentence_shards(tmp_path / "sentences", shards=1, sentences=4, tokens_per_image=T)
    lvm_evaluate.main(["--sentences", str(shards), "--out", str(tmp_path / "eval"), "--pixel-sentences", "2"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["model"] == weights.DEFAULT_MODEL and report["tokens_per_image"] == T
    assert report["pixels"]["count"] == 2  # the released tokenizer was loaded by default
    assert "warning" not in capsys.readouterr().err


# -- the card's commands, exactly as written -----------------------------------------------------------------
def _reference_decode(sd: dict[str, torch.Tensor], cfg: dict, codes: torch.Tensor) -> torch.Tensor:
    """open-muse's VQGANModel.decode_code written out functionally (no attention, as released): uint8 images."""

    def conv(name: str, h: torch.Tensor) -> torch.Tensor:
        w = sd[f"{name}.weight"]
        return F.conv2d(h, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)

    def resnet(name: str, h: torch.Tensor) -> torch.Tensor:
        gn = lambda n, x: F.group_norm(x, 32, sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)  # noqa: E731
        out = conv(f"{name}.conv2", F.silu(gn(f"{name}.norm2", conv(f"{name}.conv1", F.silu(gn(f"{name}.norm1", h))))))
        return (conv(f"{name}.nin_shortcut", h) if f"{name}.nin_shortcut.weight" in sd else h) + out

    side = int(codes.shape[1] ** 0.5)
    z = sd["quantize.embedding.weight"][codes].view(len(codes), side, side, -1).permute(0, 3, 1, 2)
    h = resnet("decoder.mid.block_2", resnet("decoder.mid.block_1", conv("decoder.conv_in", conv("post_quant_conv", z))))
    for i in reversed(range(len(cfg["channel_mult"]))):
        for j in range(cfg["num_res_blocks"] + 1):
            h = resnet(f"decoder.up.{i}.block.{j}", h)
        if i:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    norm = F.group_norm(h, 32, sd["decoder.norm_out.weight"], sd["decoder.norm_out.bias"], eps=1e-6)
    return (conv("decoder.conv_out", F.silu(norm)).clamp(0, 1) * 255).round().to(torch.uint8)


def card(command: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """Run a line of the card in a shell (globs expanded by the shell), offline, on the hub cache `home`."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # float32 on the CPU, as the reference computes
    env.pop("HF_HUB_CACHE", None)
    python = command.replace("python", sys.executable, 1)
    return subprocess.run(python, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_card_commands_run_as_written_on_the_released_weights(hub, tmp_path):
    (tmp_path / "laion").mkdir()
    _img2dataset_shard(tmp_path / "laion" / "00000.tar", 0, 3)
    done = card("python -m lvm.tokenize --shards laion/", tmp_path, hub)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines()[0] == "tokenize: writing token shards to tokens/laion (no --out given)"
    report = json.loads((tmp_path / "tokens/laion/00000.report.json").read_text())
    vq = hub / "hub/models--Emma02--vqvae_ckpts/snapshots" / COMMIT
    assert report["images"] == 3 and report["tokenizer"] == tokenizer.load(vq).identity(weights.DEFAULT_TOKENIZER)

    rng = np.random.default_rng(0)
    (tmp_path / "seq").mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)).save(tmp_path / "seq" / f"{i}.png")
    done = card("python -m lvm.prompt --frames seq/*.png --greedy", tmp_path, hub)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "wrote prediction.png, prediction_grid.png"
    assert "warning" not in done.stderr  # the released tokenizer is the released model's own
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == ["1.png", "10.png", "2.png"]  # input untouched

    # The reference: open-muse's preprocessing and encode, transformers' greedy generate, open-muse's decode.
    sd = torch.load(vq / "pytorch_model.bin", weights_only=True)
    frames = [pil_to_tensor(Image.open(tmp_path / "seq" / f"{i}.png").convert("RGB")) for i in (1, 2, 10)]
    pixels = torch.cat([F.interpolate(f[None] / 255, size=(32, 32), mode="bicubic", antialias=True) for f in frames])
    _, codes = _reference_encode(sd, MUSE, pixels.clamp(0, 1))
    llama = transformers.LlamaForCausalLM.from_pretrained(hub / "hub/models--Emma02--LVM_ckpts/snapshots" / COMMIT)
    generated = llama.eval().generate(
        codes.view(1, -1), attention_mask=torch.ones(1, 3 * T, dtype=torch.long), max_new_tokens=T,
        do_sample=False, eos_token_id=None, suppress_tokens=list(range(CODEBOOK_SIZE, VOCAB_SIZE)),
    )[:, -T:]
    with torch.no_grad():
        expected = _reference_decode(sd, MUSE, generated)[0]
    predicted = pil_to_tensor(Image.open(tmp_path / "prediction.png"))
    assert (predicted.int() - expected.int()).abs().max() <= 1  # equal up to float rounding at .5


# -- weights are data ------------------------------------------------------------------------------------------
class Payload:
    """The classic malicious checkpoint: unpickling calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_pickles_a_command_is_refused_everywhere_and_never_runs(tmp_path, tiny_tokenizer_dir, capsys):
    marker = tmp_path / "it_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.embed.weight": Payload(marker)}, "lvm_config": {}, "lvm_tokenizer": {}}, evil)
    hf_dir = tmp_path / "hf"  # the same payload as an HF folder's pytorch_model.bin
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                                                    "num_attention_heads": 4, "vocab_size": VOCAB_SIZE}))
    torch.save({"lm_head.weight": Payload(marker)}, hf_dir / "pytorch_model.bin")
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "sentences").mkdir()
    (tmp_path / "sentences" / "x.tar").write_bytes(b"")
    commands = [
        (lvm_prompt.main, ["--frames", tmp_path / "0.png", "--model", evil, "--tokenizer", tiny_tokenizer_dir]),
        (lvm_prompt.main, ["--frames", tmp_path / "0.png", "--model", hf_dir, "--tokenizer", tiny_tokenizer_dir]),
        (lvm_prompt.main, ["--frames", tmp_path / "0.png", "--tokenizer", evil]),
        (lvm_evaluate.main, ["--model", evil, "--sentences", tmp_path / "sentences", "--out", tmp_path / "report"]),
        (lvm_export.main, ["--model", evil, "--to-hf", tmp_path / "out"]),
    ]
    for main, args in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, (args, err)
        assert err.startswith("error: ") and "refused: it pickles posix.system" in err, err
    with pytest.raises(tokenizer.TokenizerLoadError, match=r"evil\.ckpt: refused: it pickles posix\.system"):
        tokenizer.load(evil)
    with pytest.raises(weights.WeightsError, match=r"evil\.ckpt: refused: it pickles posix\.system"):
        AtomicCheckpointIO().load_checkpoint(evil)  # what `lightning fit --ckpt_path` reads with
    assert not marker.exists()


# -- `lightning fit` where the config cannot run ------------------------------------------------------------------
def test_gpu_config_without_gpus_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/sentences here either: the GPUs are named first
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = str(ROOT / "configs" / "lvm_3b.yaml")
    tiny = ("on a CPU use a tiny config (configs/lvm_tiny.yaml, configs/vqgan_tiny.yaml); a paper size on CPUs holds a "
            "float32 copy of the model per device (--trainer.accelerator cpu --trainer.devices 1 --trainer.precision "
            "32-true, and the memory for it)")  # "override --trainer.accelerator" started 8 ranks of 13 GB (review 55 #2)
    for gpus, found, advice in ((0, "none", tiny),
                                (2, "only 2", "override --trainer.devices 2")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        with pytest.raises(SystemExit) as exit_info:
            lvm_cli.main(["fit", "-c", config])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and not any("Traceback" in line for line in err)
        assert err[-1] == f"error: {config} trains on 8 GPUs (accelerator gpu) and this machine has {found}; {advice}"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    vqgan = str(ROOT / "configs" / "vqgan_f16_8192.yaml")  # on a CPU it started 8 processes (review 39 #2)
    with pytest.raises(SystemExit):
        lvm_cli.main(["fit", "-c", vqgan, "--trainer.devices=8", "--data.init_args.train=/data/laion"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {vqgan} trains on 8 GPUs (accelerator gpu) and this machine has none; {tiny}")


def test_missing_training_data_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    with pytest.raises(SystemExit) as exit_info:
        lvm_cli.main(["fit", "-c", str(ROOT / "configs" / "lvm_tiny.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == (
        "error: data.train_shards: data/sentences: no .tar shards found (no such file or directory); make them with "
        "`python -m sentences.build --spec mix.yaml --out DIR` (docs/sentences.md)"
    )


# -- a model knows its tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_digest_travels_from_token_shards_to_checkpoint_and_hf_config(tmp_path, tiny_tokenizer_dir, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    tokenize(Job(shards=[str(tmp_path / "images")], out=tmp_path / "tokens", tokenizer=str(tiny_tokenizer_dir), workers=0))
    identity = tokenizer.load(tiny_tokenizer_dir).identity(str(tiny_tokenizer_dir))
    (report,) = (tmp_path / "tokens").glob("*.report.json")
    assert json.loads(report.read_text())["tokenizer"] == identity

    spec = {"seed": 0, "window": 64, "sources": [{"name": "v", "kind": "single", "shards": str(tmp_path / "tokens")}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec))
    build(load_spec(tmp_path / "mix.yaml"), tmp_path / "sentences")
    assert json.loads((tmp_path / "sentences" / "index.json").read_text())["tokenizer"] == identity

    data = LVMDataModule(str(tmp_path / "sentences"), seq_len=16, batch_size=1, num_workers=0)
    assert data.tokenizer == identity
    module = LVMModule("tiny", overrides=dict(dim=32, mlp_dim=64, n_layers=1, n_heads=2, max_seq_len=64), warmup_steps=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "lvm.ckpt")
    model = load_lvm(tmp_path / "lvm.ckpt")
    assert model.tokenizer_info == identity

    lvm_export.main(["--model", str(tmp_path / "lvm.ckpt"), "--to-hf", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[TOKENIZER_KEY] == identity
    assert load_lvm(tmp_path / "hf").tokenizer_info == identity
    capsys.readouterr()

    # Same shape, other weights: only the digest tells them apart, and a reader warns in one line.
    torch.manual_seed(1)
    other = tokenizer.VQTokenizer(tiny_vqgan_config()).save(tmp_path / "other")
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    args = ["--frames", str(tmp_path / "0.png"), "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "out" / "p.png")]
    lvm_prompt.main([*args, "--tokenizer", str(tiny_tokenizer_dir)])
    assert capsys.readouterr().err == ""
    lvm_prompt.main([*args, "--tokenizer", str(other)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: tokenizer {other} (digest ")
    assert f"not the one {tmp_path / 'hf'} was trained on, {tiny_tokenizer_dir} (digest {identity['digest'][:12]}" in err


def test_released_model_checks_tokens_per_image_and_mixed_tokenizers_are_refused(tiny_tokenizer, capsys):
    released = torch.nn.Module()
    released.tokenizer_info = RELEASED_TOKENIZER
    assert not check_tokenizer(released, weights.DEFAULT_MODEL, {**tiny_tokenizer.identity(), "name": "Emma02/vqvae_ckpts@v1"})
    assert check_tokenizer(released, weights.DEFAULT_MODEL, tiny_tokenizer.identity("demo_out/tokenizer"))
    err = capsys.readouterr().err
    assert "16 tokens per image" in err and "Emma02/vqvae_ckpts (256 tokens per image, 8192 codes)" in err
    a, b = ({"name": n, "digest": d} for n, d in (("t1", "aa" * 16), ("t2", "bb" * 16)))
    assert one_tokenizer([("x.tar", None), ("y.tar", a), ("z.tar", a)]) == a
    with pytest.raises(SentenceError, match=r"^w\.tar: made by tokenizer t2 \(digest bbbbbbbbbbbb\), but y\.tar by t1"):
        one_tokenizer([("y.tar", a), ("w.tar", b)])
    # the same weights under two preprocessing policies make other tokens: refused as checkpoints refuse them (review
    # 44 #2); a record from before preprocessing was recorded matches either
    squash, crop = ({**a, "preprocessing": {"resize": r}} for r in ("stretch", "center_crop"))
    with pytest.raises(SentenceError, match=r"^w\.tar: .* under other preprocessing \(\{'resize': 'center_crop'\} "
                                            r"against \{'resize': 'stretch'\}\)"):
        one_tokenizer([("y.tar", squash), ("w.tar", crop)])
    assert one_tokenizer([("y.tar", a), ("w.tar", crop)]) == a


def test_checkpoints_in_the_pre_zip_format_load_though_they_cannot_be_memory_mapped(tmp_path):
    """torch < 1.6 wrote pickles that `mmap=True` refuses; transformers loads such pytorch_model.bin files, so must we."""
    model = LVM(LVMConfig(dim=16, mlp_dim=32, n_layers=1, n_heads=2, max_seq_len=32))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = weights.torch_load(tmp_path / "pytorch_model.bin", mmap=True)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
