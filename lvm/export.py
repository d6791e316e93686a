"""`python -m lvm.export --model CKPT --to-hf OUT`: write a checkpoint as a Hugging Face Llama directory.

The result loads with `transformers.LlamaForCausalLM.from_pretrained(OUT)` and its
`generate` produces the same tokens as `lvm.generate` in float32 (its generation_config
suppresses the special ids, as our sampler does; docs/inference.md says why bf16 can differ).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common.errors import UserError, exit_on
from common.files import output_folder
from common.options import HelpFormatter, add_dtype_arg, add_model_arg, at_least, torch_dtype
from common.vocab import EOS_ID, PAD_ID
from lvm.checkpoint import load_lvm, trained_layout
from lvm.hf import save_hf

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub counts them


def shard_size(text: str) -> int:
    """An argparse `type` for `--max-shard-size` ("2GB", "500MB"): bytes. Parsed here, before the model is
    loaded, because huggingface_hub parses it only while writing and has no public parser to call early."""
    number, unit = text.strip()[:-2], text.strip()[-2:].upper()
    try:
        size = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB or 500MB (units: KB, MB, GB, TB)") from None
    if not 1 <= size < math.inf:  # infGB passed, then int() raised OverflowError
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite size")
    return int(size)


def check_out(out: Path, model: Path) -> None:
    """`--to-hf` must be a new folder or an earlier Llama export, and not the model's own folder: the export replaces
    config.json and the weight files there before the new ones are complete, so it would overwrite another model's
    files (a tokenizer folder holds the same names) or, killed part-way, lose the only copy of its own input."""
    output_folder(out, "--to-hf")
    if model.is_dir() and out.resolve() == model.resolve():
        raise UserError(out, "--to-hf is the --model folder; export into another folder (then replace this one)")
    config = out / "config.json"
    if config.is_file():
        try:
            found = json.loads(config.read_text())
            ours = (found.get("model_type"), found.get("eos_token_id"), found.get("pad_token_id")) == ("llama", EOS_ID, PAD_ID)
            what = f"model_type {found.get('model_type')!r}" if found.get("model_type") != "llama" else "a Llama model not exported by lvm.export"
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours, what = False, "unreadable"
        if not ours:  # an earlier export of ours (its EOS and PAD are our special ids) may be replaced
            raise UserError(out, f"--to-hf holds another model (config.json: {what}), which the export would "
                                 "overwrite; give a new folder or an earlier export")


@exit_on
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvm.export", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_model_arg(parser, None)
    parser.add_argument("--to-hf", required=True, metavar="OUT", help="output directory")
    add_dtype_arg(parser, "as stored")
    parser.add_argument("--tokens-per-image", type=at_least(1),
                        help="max_new_tokens in generation_config.json (default: what the model records, else 256)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB", help="safetensors shard size, e.g. 2GB")
    args = parser.parse_args(argv)
    check_out(Path(args.to_hf), Path(args.model))
    model = load_lvm(args.model, dtype=torch_dtype(args.dtype, device=None))
    tokens_per_image, codebook_size = trained_layout(model)
    out = save_hf(model, args.to_hf, tokens_per_image=args.tokens_per_image or tokens_per_image,
                  max_shard_size=args.max_shard_size, codebook_size=codebook_size)
    print(f"wrote {out} ({model.cfg.num_params() / 1e6:.1f}M parameters, {model.head.weight.dtype})")


if __name__ == "__main__":
    main()
