"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) proven on CPU ranks.

The 2-rank tests run the real configs/lvm_1b.yaml with only the accelerator, devices, model shape, data and
a flat learning rate overridden, in processes talking over gloo. `global_batches.GlobalBatches` gives every
step the same rows whatever the number of ranks, so a sharded run can be compared with a 1-rank one.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.cli import LightningCLI

from lvm import export
from lvm.checkpoint import load_lvm
from lvm.model import LVM, LVMConfig
from lvm.parallelize import gather, parallelize

ROOT = Path(__file__).resolve().parents[1]
CONFIG_1B = str(ROOT / "configs" / "lvm_1b.yaml")
MINI = dict(dim=32, mlp_dim=64, n_layers=2, n_heads=2, max_seq_len=64)
GLOBAL_ROWS = 4  # rows per micro-batch over all ranks


def args_1b(devices: int, *args: str) -> list[str]:
    """`lightning fit` arguments: configs/lvm_1b.yaml on `devices` CPU processes, tiny shape, arranged batches."""
    return [
        "-c", CONFIG_1B,
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.precision", "32-true",
        "--model.size", "tiny", "--model.overrides", str(MINI),
        "--data", "global_batches.GlobalBatches", "--data.batch_size", str(GLOBAL_ROWS // devices), "--data.seq_len", "48",
        # a flat learning rate, so that the schedule does not depend on max_steps (changed on resume)
        "--model.lr", "3e-3", "--model.min_lr", "3e-3", "--model.warmup_steps", "1", "--trainer.log_every_n_steps", "1",
        *args,
    ]


def fit_1b(run_dir: Path, devices: int, *args: str) -> None:
    """`lightning fit` of `args_1b` in `run_dir`, in new processes (Lightning starts the other ranks)."""
    run_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "lvm.cli", "fit", *args_1b(devices, *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def logged(run_dir: Path, version: int, key: str) -> dict[int, float]:
    rows = csv.DictReader((run_dir / f"runs/lvm_1b/logs/version_{version}/metrics.csv").open())
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


@pytest.mark.slow
def test_sharded_1b_config_matches_one_rank_resumes_exactly_and_exports(tmp_path, tiny_tokenizer_dir, monkeypatch):
    # Reference: one process (this one), no sharding, no activation checkpointing, 4 rows per micro-batch, 6 steps.
    (tmp_path / "one").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    monkeypatch.setattr(sys, "argv", ["lightning"])
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args_1b(
        1, "--trainer.strategy", "auto", "--model.activation_checkpointing", "false", "--trainer.max_steps", "6"))
    cli.trainer.fit(cli.model, cli.datamodule)
    # The config as written (FSDP2 + activation checkpointing) on 2 ranks of 2 rows: 3 steps, then
    # `--ckpt_path last` to step 6, sampling images from the sharded model at step 5.
    sharded = tmp_path / "two"
    fit_1b(sharded, 2, "--trainer.max_steps", "3")
    fit_1b(sharded, 2, "--trainer.max_steps", "6", "--ckpt_path", "last",
           "--trainer.callbacks+=lvm.callbacks.SampleImages", f"--trainer.callbacks.tokenizer={tiny_tokenizer_dir}",
           "--trainer.callbacks.every_n_steps=5")

    # Equal up to the order of float sums (the gradient reduce-scatter, the norm over shards).
    for key, rel in (("train/loss", 1e-5), ("train/grad_norm", 1e-4)):
        reference = logged(tmp_path / "one", 0, key)
        first, resumed = logged(sharded, 0, key), logged(sharded, 1, key)
        assert sorted(reference) == list(range(6)) and sorted(first) == [0, 1, 2] and sorted(resumed) == [3, 4, 5], key
        for step, value in {**first, **resumed}.items():
            assert value == pytest.approx(reference[step], rel=rel), (key, step)

    ckpt_path = sharded / "runs/lvm_1b/checkpoints/last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["GlobalBatches"] == {"batches_consumed": 12}  # 2 micro-batches a step
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in LVM(LVMConfig(**MINI)).state_dict()}
    # The gathered checkpoint holds the whole model: the weights the 1-rank run reached, read without Lightning.
    # Six AdamW steps of 3e-3 moved every tensor by ~1.5e-2; float-order noise in near-zero gradients, which
    # Adam scales up, leaves a few elements up to ~1e-4 apart.
    model = load_lvm(ckpt_path)
    reference = load_lvm(tmp_path / "one/runs/lvm_1b/checkpoints/last.ckpt")
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4, msg=name)

    export.main(["--model", str(ckpt_path), "--to-hf", str(tmp_path / "hf")])
    exported = load_lvm(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name

    image = torchvision.io.read_image(str(sharded / "runs/lvm_1b/logs/version_1/samples/step_00000005.png"))
    assert image.shape == (3, 64 + 4, 3 * 64 + 8)  # context | sampled | true, gathered from the shards


def _loss_and_grads(model: LVM, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
def test_a_sharded_resume_trains_with_this_runs_optimizer_settings(tmp_path):
    """FSDP2 restores the optimizer where the settings of the run's config are applied too late for a one-process
    resume's hook: the old weight decay and betas stayed, and the first step kept the old lr (review 43 #1)."""
    run = tmp_path / "two"
    fit_1b(run, 2, "--trainer.max_steps", "2")
    fit_1b(run, 2, "--trainer.max_steps", "4", "--ckpt_path", "last", "--model.lr", "1e-3", "--model.min_lr", "1e-3",
           "--model.weight_decay", "0.0", "--model.betas", "[0.8, 0.9]")
    assert set(logged(run, 1, "lr-AdamW/pg1").values()) == {1e-3}
    groups = torch.load(run / "runs/lvm_1b/checkpoints/last.ckpt", weights_only=False)["optimizer_states"][0]["param_groups"]
    assert {(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in groups} == {(1e-3, 0.0, (0.8, 0.9))}


def test_activation_checkpointing_recomputes_each_block_with_the_same_numbers():
    cfg = LVMConfig(**MINI)
    tokens = torch.randint(0, 8192, (2, 33), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = LVM(cfg)
    checkpointed = parallelize(LVM(cfg), activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # applied in place: names unchanged

    calls = []
    for block in checkpointed.layers:  # a pre-hook: recomputation stops as soon as it has what backward needs
        block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = _loss_and_grads(checkpointed, tokens)
    assert len(calls) == 2 * cfg.n_layers  # each block ran forward again in the backward pass
    want_loss, want_grads = _loss_and_grads(plain, tokens)
    assert torch.equal(loss, want_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=0, msg=name)


def test_gather_returns_an_unsharded_model_itself():
    model = LVM(LVMConfig(**MINI))
    assert gather(model, "cpu") is model


TIED_SHARD_CHECK = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from lvm.model import LVM, LVMConfig
from lvm.parallelize import gather, parallelize
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=0, world_size=1)  # no port to clash
cfg = LVMConfig(**{mini}, tie_embeddings=True)
torch.manual_seed(0)
plain, sharded = LVM(cfg), LVM(cfg)
sharded.load_state_dict(plain.state_dict())
parallelize(sharded, init_device_mesh("cpu", (1,)))
tokens = torch.randint(0, 8192, (2, 16))
for model in (plain, sharded):
    model(tokens).logsumexp(-1).sum().backward()
grad = sharded.embed.weight.grad.full_tensor()
copy = gather(sharded, "cpu")
print(sharded.head.weight is sharded.embed.weight, torch.allclose(grad, plain.embed.weight.grad, atol=1e-6),
      copy.head.weight is copy.embed.weight, torch.equal(copy(tokens), plain(tokens)))
dist.destroy_process_group()
"""


def test_tied_head_stays_tied_through_fsdp2_and_gather(tmp_path):
    """FSDP2 shards the embedding and the head in one (root) unit, so a tied matrix stays one tensor with one
    gradient; the gathered copy is tied again. A process of its own: one gloo rank on CPU."""
    code = TIED_SHARD_CHECK.format(mini=MINI)
    env = {**os.environ, "STORE": str(tmp_path / "store")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"] * 4
