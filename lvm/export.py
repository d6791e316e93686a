"""`python -m lvm.export --model CKPT --to-hf OUT`: write a checkpoint as a Hugging Face Llama directory.

The result loads with `transformers.LlamaForCausalLM.from_pretrained(OUT)` and its
`generate` produces the same tokens as `lvm.generate` (its generation_config
suppresses the special ids, as our sampler does).
"""

from __future__ import annotations

import argparse

from common.errors import exit_on
from common.options import add_dtype_arg, torch_dtype
from lvm.checkpoint import load_lvm
from lvm.hf import save_hf


@exit_on
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvm.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--ckpt", required=True, dest="model",
                        help="our Lightning .ckpt (or an HF Llama directory to re-export); --ckpt is the old name")
    parser.add_argument("--to-hf", required=True, metavar="OUT", help="output directory")
    add_dtype_arg(parser, "as stored")
    parser.add_argument("--tokens-per-image", type=int, default=256, help="max_new_tokens in generation_config.json")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB")
    args = parser.parse_args(argv)
    model = load_lvm(args.model, dtype=torch_dtype(args.dtype, device=None))
    out = save_hf(model, args.to_hf, tokens_per_image=args.tokens_per_image, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({model.cfg.num_params() / 1e6:.1f}M parameters, {model.head.weight.dtype})")


if __name__ == "__main__":
    main()
