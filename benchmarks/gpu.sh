#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, within 8 minutes on one H100/H200, in this order:
#   `pytest -m gpu`, tokenizer encoding at the released shape (images/s vs the FLOP limit), the tokenize
#   pipeline vs the encoder alone, training tokens/s and MFU of 300m and 1b at seq 4096 bf16 (1b sharded with
#   FSDP2 as configs/lvm_1b.yaml trains), decoding at batch 1 (s per 256-token frame vs the bandwidth limit)
#   and batch 32, and last the training with compile on (the slowest stage gets what is left).
#
#   benchmarks/gpu.sh [OUT]             # OUT (default runs/gpu_bench) gets gpu.json, gpu.md (rows for
#                                       # BENCHMARKS.md) and one log per stage
#   benchmarks/gpu.sh --dry-run [OUT]   # the same stages on CPU with tiny shapes (a test runs this)
#
# Runs with the project's .venv (what `make install` makes; PYTHON=... to choose another). On a GPU node that cannot
# install (no internet): run benchmarks/device_wheels.sh where pip can download and take .whl/ along; this script
# installs those wheels into a temporary folder for its own run. Each stage runs under a time limit cut to what is
# left of the 8 minutes; a stage that fails or runs out of time is reported as such (the benchmarks write their
# rows as they go, so a stage cut short keeps what it measured), the others still run, and the exit status is 1.
set -uo pipefail
usage="usage: benchmarks/gpu.sh [--dry-run] [OUT]"
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
if (($# > 1)) || [[ ${1:-} == -* ]]; then echo "$usage" >&2; exit 2; fi
out=$(realpath -m "${1:-$(dirname "$0")/../runs/gpu_bench}")  # relative to where it is run, before the cd
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then  # benchmarks/device_wheels.sh's, for a node that cannot install
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
    echo "error: .whl: $PY -m pip could not install the wheels there" >&2; exit 2
  fi
  export PYTHONPATH="$PYTHONPATH:$site"
fi
# Every stage's imports, checked before the first: without one, each stage failed at import in turn.
if ! missing=$("$PY" -c "
import importlib
for name in ('torch', 'pytest', 'skimage', 'transformers', 'tokenizer', 'lvm.train', 'lvm.tokenize.pipeline',
             'lvm.generate', 'lvm.annotate.pipeline', 'lvm.probe.data'):
    try:
        importlib.import_module(name)
    except ImportError as error:
        raise SystemExit(f'{name} ({error})')
" 2>&1); then
  echo "error: $PY: cannot import $missing; run make install first (or set PYTHON; on a node that cannot install, benchmarks/device_wheels.sh)" >&2
  exit 2
fi
if ((!dry)) && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
  echo "error: no CUDA device (torch.cuda.is_available() is False); on a CPU, --dry-run runs the stages small" >&2
  exit 2
fi
mkdir -p "$out"
# A stage that fails must not show an earlier run's figure: its files go, and only they (OUT may hold others).
for name in pytest_gpu encode tokenize train decode train_compiled; do
  rm -f "$out/$name.log" "$out/$name.json"
done
rm -f "$out/pytest_gpu.xml" "$out/gpu.json" "$out/gpu.md"
: > "$out/stages.tsv"
budget=470  # seconds for all stages: leaves the report and start-up well inside 8 minutes
start=$SECONDS

# stage NAME LIMIT_S COMMAND...: run with stdout+stderr in OUT/NAME.log; record status and seconds.
stage() {
  local name=$1 limit=$2 left=$((budget - (SECONDS - start))) began=$SECONDS status rc
  shift 2
  if ((left < 10)); then
    status=skipped
  else
    local cap=$((limit < left ? limit : left))
    timeout -k 10 $cap "$@" > "$out/$name.log" 2>&1
    rc=$?
    if ((rc == 0)); then status=ok
    elif ((rc == 124)) || ((rc == 137 && SECONDS - began >= cap)); then status=timeout  # 137: killed after the grace
    else status="failed($rc)"; fi
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - began)) >> "$out/stages.tsv"
  echo "$name: $status ($((SECONDS - began)) s)"
}

if ((dry)); then
  stage pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$out/pytest_gpu.xml" tests/test_train.py
  stage encode 120 "$PY" benchmarks/bench_tokenizer_encode.py --device cpu --tiny --dtype fp32 --batch-sizes 1 \
    --iters 1 --warmup 0 --json "$out/encode.json"
  stage tokenize 120 "$PY" benchmarks/bench_tokenize.py --images 16 --jpeg-side 64 --batch-size 4 --workers 1 \
    --threads 1 --json "$out/tokenize.json"
  stage train 120 "$PY" benchmarks/bench_train.py --gpu --device cpu --sizes tiny --batches 2 --accumulate 2 --seq 64 \
    --sharded tiny --steps 2 --warmup 1 --json "$out/train.json"
  stage decode 120 "$PY" benchmarks/bench_generate.py --throughput --device cpu --size tiny \
    --tokens-per-image 16 --frames 1 --batch-sizes 1 2 --json "$out/decode.json"
  # --compile is parsed and applied, but TORCH_COMPILE_DISABLE makes it a no-op (compiling takes minutes on CPU)
  stage train_compiled 120 env TORCH_COMPILE_DISABLE=1 "$PY" benchmarks/bench_train.py --gpu --device cpu --compile \
    --sizes tiny --batches 2 --accumulate 2 --seq 64 --sharded tiny --steps 2 --warmup 1 --json "$out/train_compiled.json"
else
  # Cheap, most wanted figures first; compiled training last: it takes what is left of the budget.
  stage pytest_gpu 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$out/pytest_gpu.xml"
  stage encode 60 "$PY" benchmarks/bench_tokenizer_encode.py --json "$out/encode.json"
  stage tokenize 120 "$PY" benchmarks/bench_tokenize.py --gpu --images 8000 --json "$out/tokenize.json"
  stage train 90 "$PY" benchmarks/bench_train.py --gpu --steps 10 --warmup 3 --json "$out/train.json"
  stage decode 120 "$PY" benchmarks/bench_generate.py --throughput --compile --frames 1 --json "$out/decode.json"
  stage train_compiled 210 "$PY" benchmarks/bench_train.py --gpu --compile --steps 10 --warmup 5 \
    --json "$out/train_compiled.json"
fi

"$PY" benchmarks/gpu_report.py "$out" $( ((dry)) && echo --dry-run) && ! grep -qv "	ok	" "$out/stages.tsv"
