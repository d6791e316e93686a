"""Generation speed: ours against `transformers`, and per-frame throughput against the memory-bandwidth limit.

    python benchmarks/bench_generate.py [--compile]        # CPU: tiny model, greedy tokens/s, ours vs HF generate
    python benchmarks/bench_generate.py --throughput --compile   # GPU: 1b config, s/frame at batch 1, images/s at 32
    python benchmarks/bench_generate.py --throughput --device cpu --size tiny --tokens-per-image 16 --frames 1   # smoke run

Compare mode exports the same random weights to a Hugging Face directory (`lvm.hf.save_hf`),
generates one frame (256 tokens) greedily after a 2-frame prompt with both, checks the
tokens are identical, and reports the best of `--repeats` runs.

Throughput mode rolls out frames after a full context (the frames that fit, 15 at most)
with random bf16 weights, sliding the window each frame as `lvm.prompt` does, and
compares with the bandwidth limit measured in the same run: every decode step must read
all weights and the whole static KV cache once, so a frame takes at least
tokens_per_image * (weight bytes + batch * cache bytes) / bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from common.files import json_text, write_atomic
from common.options import HelpFormatter
from common.vocab import BOS_ID, CODEBOOK_SIZE
from lvm.generate import GREEDY, Decoder, context_frames, rollout, rollout_cache_len
from lvm.hf import save_hf
from lvm.model import LVM, LVMConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def compare(args: argparse.Namespace) -> None:
    import transformers

    torch.manual_seed(0)
    model = LVM(LVMConfig.from_name(args.size)).eval()
    T = args.tokens_per_image
    prompt = torch.cat([torch.full((1, 1), BOS_ID), torch.randint(0, CODEBOOK_SIZE, (1, 2 * T))], 1)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp, tokens_per_image=T)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

    def ours(compile: bool):
        with Decoder(model, 1, prompt.shape[1] + T, compile=compile) as decoder:
            return decoder.generate(prompt, T, GREEDY)

    def theirs():
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=T, do_sample=False)[:, prompt.shape[1]:]

    cpu = torch.device("cpu")
    t_hf, reference = best_time(theirs, args.repeats, cpu)
    print(f"{args.size} model ({model.cfg.num_params() / 1e6:.1f}M params), CPU, {torch.get_num_threads()} thread(s), "
          f"prompt {prompt.shape[1]} tokens, {T} new tokens greedy, best of {args.repeats}")
    print(f"transformers {transformers.__version__} generate: {T / t_hf:.0f} tokens/s ({t_hf:.3f} s)")
    for compile in [False, True] if args.compile else [False]:
        if compile:
            ours(True)  # compilation, not timed
        seconds, tokens = best_time(lambda: ours(compile), args.repeats, cpu)
        assert torch.equal(tokens, reference), "ours and transformers generated different tokens"
        print(f"ours, static KV cache{' + torch.compile' if compile else ''}: {T / seconds:.0f} tokens/s "
              f"({seconds:.3f} s), {t_hf / seconds:.2f}x transformers; tokens identical")


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical ceiling for decoding
    (1 GiB on a GPU; 64 MiB on a CPU, where only smoke runs happen)."""
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = best_time(lambda: dst.copy_(src), 5, device)
    return 2 * nbytes / seconds


def throughput(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = LVM(LVMConfig.from_name(args.size)).to(dtype).eval()
    T = args.tokens_per_image
    window = context_frames(model, T)
    bw = bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_len = rollout_cache_len(model, T)
    cache_bytes = 2 * model.cfg.n_layers * cache_len * model.cfg.dim * torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.size} ({weight_bytes / 1e9:.2f} GB weights, {dtype}) on {name}; "
          f"measured copy bandwidth {bw / 1e9:.0f} GB/s; {window} context frames x {T} tokens; compile={args.compile}")
    rows = []
    for batch in args.batch_sizes:
        frames = torch.randint(0, CODEBOOK_SIZE, (batch, window, T), device=device)
        rollout(model, frames, 1, GREEDY, compile=args.compile)  # warm-up (and compilation)
        seconds, _ = best_time(lambda: rollout(model, frames, args.frames, GREEDY, compile=args.compile), 1, device)
        per_frame = seconds / args.frames
        floor = T * (weight_bytes + batch * cache_bytes) / bw
        print(f"batch {batch}: {per_frame:.3f} s per frame step, {batch / per_frame:.1f} images/s, "
              f"{batch * T / per_frame:.0f} tokens/s; bandwidth floor {floor:.3f} s per frame "
              f"({100 * floor / per_frame:.0f}% of the limit)")
        rows.append(dict(batch=batch, seconds_per_frame=per_frame, images_per_s=batch / per_frame, floor_seconds=floor))
        if args.json:  # after every row: a run cut by its time limit keeps what it measured
            write_atomic(args.json, json_text({"device": name, "size": args.size, "compile": args.compile,
                                               "bandwidth_bytes_per_s": bw, "context_frames": window, "rows": rows}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--throughput", action="store_true", help="per-frame throughput mode (GPU)")
    p.add_argument("--size", help="model size (default: tiny for compare, 1b for throughput)")
    p.add_argument("--device", default="cuda", help="throughput mode device")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--frames", type=int, default=3, help="frames timed per batch size (throughput)")
    p.add_argument("--tokens-per-image", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for compare mode")
    p.add_argument("--json", help="throughput mode: also write the figures here")
    args = p.parse_args()
    given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    if wrong := sorted(given & ({"--device", "--batch-sizes", "--frames", "--json"} if not args.throughput else
                                {"--threads", "--repeats"})):  # accepted and ignored, they misled
        p.error(f"{', '.join(wrong)}: not used in {'throughput' if args.throughput else 'compare'} mode")
    if args.throughput:
        args.size = args.size or "1b"
        throughput(args)
    else:
        args.size = args.size or "tiny"
        torch.set_num_threads(args.threads)
        compare(args)


if __name__ == "__main__":
    main()
