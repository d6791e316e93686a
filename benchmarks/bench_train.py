"""Training speed: tokens/s of a full optimizer step, ours against `transformers`, and MFU on a GPU.

    python benchmarks/bench_train.py                        # CPU: tiny config, ours vs LlamaForCausalLM
    python benchmarks/bench_train.py --gpu [--compile]      # GPU: 300m and 1b at seq 4096, bf16, tokens/s and MFU
    python benchmarks/bench_train.py --gpu --device cpu --sizes tiny --batches 2 --seq 64 --steps 2 --warmup 1   # smoke run

CPU mode trains the tiny config's shape (batch 8 x seq 256, fp32) with the same weights, loss
(cross-entropy over all positions) and AdamW in the same plain loop for both models, alternating
them `--repeats` times so that both see the same machine load, and reports the median. The
`lightning` row is the real training path (LVMModule + Trainer: NaN check, clipping, logging),
i.e. what `lightning fit` gets.

GPU mode runs that Lightning path for each size on one GPU with synthetic tokens and reports
tokens/s and MFU = tokens/s x LVMConfig.flops_per_token(seq) / the device's dense bf16 peak FLOP/s
(`lvm.peaks`, the table the training log uses too). Sizes in `--sharded` (default 1b) train as
configs/lvm_1b.yaml does: FSDP2 through ModelParallelStrategy with activation checkpointing (here over
one GPU, so the figure includes the sharding machinery but no communication); the others as 300m/600m
do (one replica, no recomputation). MFU counts the model's FLOPs only, not the recomputation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, IterableDataset

from common.files import json_text, write_atomic
from common.options import HelpFormatter
from common.vocab import CODEBOOK_SIZE
from lvm.hf import config_to_hf, hf_name
from lvm.model import LVM, LVMConfig
from lvm.peaks import dense_bf16_peak
from lvm.train import LVMModule


class RandomTokens(IterableDataset):
    """Endless batches of random codes: the model's speed does not depend on the values."""

    def __init__(self, batch: int, seq: int) -> None:
        self.batch, self.seq = batch, seq

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            window = torch.randint(0, CODEBOOK_SIZE, (self.batch, self.seq + 1), generator=g)
            yield {"input_ids": window[:, :-1], "labels": window[:, 1:]}


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after `warmup` (compilation, allocator warm-up)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, *_) -> None:
        if trainer.global_step == self.warmup and not self.start:  # the first micro-batch of the first timed step
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()


def lightning_tokens_per_sec(
    size: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    device: str,
    compile: bool,
    sharded: bool = False,
    overrides: dict | None = None,
    accumulate: int = 1,
) -> float:
    """Tokens/s of `steps` optimizer steps of the real training path after `warmup` steps (bf16 on CUDA,
    fp32 on CPU), each of `accumulate` micro-batches of `batch` rows; `sharded`: FSDP2 + activation checkpointing,
    as the 1b/3b configs train."""
    L.seed_everything(0, verbose=False)
    module = LVMModule(size=size, overrides=overrides, warmup_steps=1, compile=compile, activation_checkpointing=sharded)
    timer = StepTimer(warmup)
    cuda = device == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
        strategy=ModelParallelStrategy(save_distributed_checkpoint=False) if sharded else "auto",
        max_steps=warmup + steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, DataLoader(RandomTokens(batch, seq), batch_size=None, pin_memory=cuda))
    return steps * accumulate * batch * seq / (timer.end - timer.start)


def loop_tokens_per_sec(model: torch.nn.Module, logits_of, x: torch.Tensor, steps: int) -> float:
    """Tokens/s of `steps` plain training steps (forward, loss, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    inputs, labels = x[:, :-1], x[:, 1:]

    def step() -> None:
        loss = F.cross_entropy(logits_of(inputs).flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * inputs.numel() / (time.perf_counter() - start)


def cpu(args: argparse.Namespace) -> None:
    import transformers

    torch.set_num_threads(args.threads)
    cfg = LVMConfig.from_name("tiny", max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = LVM(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg, torch.float32), attn_implementation="sdpa"))
    hf.load_state_dict({hf_name(k): v.clone() for k, v in ours.state_dict().items()})
    x = torch.randint(0, CODEBOOK_SIZE, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights, same logits: the comparison is of the same computation
        torch.testing.assert_close(ours(x[:, :-1]), hf(x[:, :-1]).logits, atol=1e-4, rtol=1e-4)
    rates = {"lvm (plain loop)": [], "transformers LlamaForCausalLM": [], "lvm (lightning fit path)": []}
    for _ in range(args.repeats):
        rates["lvm (plain loop)"].append(loop_tokens_per_sec(ours, ours, x, args.steps))
        rates["transformers LlamaForCausalLM"].append(loop_tokens_per_sec(hf, lambda t: hf(t).logits, x, args.steps))
        rates["lvm (lightning fit path)"].append(
            lightning_tokens_per_sec("tiny", args.batch, args.seq, args.steps, 2, "cpu", False, overrides={"max_seq_len": args.seq})
        )
    print(f"tiny ({cfg.num_params():,} params), batch {args.batch} x seq {args.seq}, fp32, "
          f"{args.threads} thread(s), median of {args.repeats}:")
    reference = statistics.median(rates["transformers LlamaForCausalLM"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:32s} {rate:10,.0f} tokens/s  ({rate / reference:.2f}x transformers)")


def gpu(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    peak = dense_bf16_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown: no MFU"
    print(f"{name}, {'bf16' if device.type == 'cuda' else 'fp32'}, seq {args.seq}, compile={args.compile}, {peak_text}")
    rows = []
    for size, batch, accumulate in zip(args.sizes, args.batches, args.accumulate):
        sharded = size in args.sharded
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate = lightning_tokens_per_sec(size, batch, args.seq, args.steps, args.warmup, device.type, args.compile, sharded,
                                        accumulate=accumulate)
        mfu = rate * LVMConfig.from_name(size).flops_per_token(args.seq) / peak if peak else None
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        print(f"  {size:5s} batch {batch:2d} x {accumulate}{' FSDP2+AC' if sharded else ''}: {rate:10,.0f} tokens/s  "
              f"MFU {f'{mfu:.1%}' if mfu else 'n/a'}" + (f"  (peak memory {memory:.1f} GiB)" if memory else ""))
        rows.append(dict(size=size, batch=batch, accumulate=accumulate, seq=args.seq, compile=args.compile, sharded=sharded,
                         tokens_per_s=rate, mfu=mfu, peak_memory_gib=memory))
        if args.json:  # after every row: a run cut by its time limit keeps what it measured
            write_atomic(args.json, json_text({"device": name, "peak_flops": peak, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU mode: sizes at seq 4096, bf16")
    parser.add_argument("--compile", action="store_true", help="GPU mode: torch.compile each block")
    parser.add_argument("--device", default="cuda", help="GPU mode: cpu for a smoke run (fp32, no MFU)")
    parser.add_argument("--sharded", nargs="*", default=["1b"], help="GPU mode: sizes trained with FSDP2 + recomputation")
    parser.add_argument("--json", help="GPU mode: also write the figures here")
    parser.add_argument("--sizes", nargs="+", default=["300m", "1b"])
    # The configs' micro-batches and accumulation (configs/lvm_300m.yaml: 4 x 4, lvm_1b.yaml: 8 x 2)
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8], help="GPU mode: rows per micro-batch, one per size")
    parser.add_argument("--accumulate", nargs="+", type=int, default=[4, 2],
                        help="GPU mode: micro-batches per optimizer step, one per size")
    parser.add_argument("--seq", type=int, default=None, help="default: 256 on CPU, 4096 on GPU")
    parser.add_argument("--batch", type=int, default=8, help="CPU mode: rows per step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=10, help="GPU mode: untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="CPU mode: alternations of the models")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU mode: torch threads")
    args = parser.parse_args()
    given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    gpu_only, cpu_only = {"--compile", "--device", "--sharded", "--json", "--sizes", "--batches", "--accumulate", "--warmup"}, \
        {"--batch", "--repeats", "--threads"}
    if wrong := sorted(given & (cpu_only if args.gpu else gpu_only)):  # accepted and ignored, they misled
        parser.error(f"{', '.join(wrong)}: not used in {'GPU' if args.gpu else 'CPU'} mode")
    for name in ("batches", "accumulate"):  # zip would drop the sizes without one, silently
        if args.gpu and len(args.sizes) != len(getattr(args, name)):
            parser.error(f"--{name}: {len(getattr(args, name))} value(s) for {len(args.sizes)} --sizes; give one per size")
    args.seq = args.seq or (4096 if args.gpu else 256)
    args.steps = args.steps or (30 if args.gpu else 10)
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
