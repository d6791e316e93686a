"""`python -m lvm.export --to-hf OUT --ckpt CKPT`: write a checkpoint as a Hugging Face Llama directory.

The result loads with `transformers.LlamaForCausalLM.from_pretrained(OUT)` and its
`generate` produces the same tokens as `lvm.generate` (its generation_config
suppresses the special ids, as our sampler does).
"""

from __future__ import annotations

import argparse

import torch

from lvm.checkpoint import CheckpointError, load_lvm
from lvm.errors import exit_on
from lvm.hf import save_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@exit_on(CheckpointError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvm.export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="our Lightning .ckpt (or an HF Llama directory to re-export)")
    parser.add_argument("--to-hf", required=True, metavar="OUT", help="output directory")
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype to write (default: as stored)")
    parser.add_argument("--tokens-per-image", type=int, default=256, help="max_new_tokens in generation_config.json")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB")
    args = parser.parse_args(argv)
    model = load_lvm(args.ckpt, dtype=DTYPES.get(args.dtype))
    out = save_hf(model, args.to_hf, tokens_per_image=args.tokens_per_image, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({model.cfg.num_params() / 1e6:.1f}M parameters, {model.head.weight.dtype})")


if __name__ == "__main__":
    main()
