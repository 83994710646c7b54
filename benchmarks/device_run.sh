#!/usr/bin/env bash
# One prepared run on a lent GPU (issue 17): install the carried wheels, run tests/gpu, then the benchmark
# rows, 1.1B first and 3B after. Everything lands under $OUT (device tool) or ./device-out, within ~420 s.
#
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=480)
#
# .whl holds bitsandbytes==0.50.2 and peft==0.21.2 (see docs/benchmarks.md for the download line). Each
# piece has its own timeout, so one failure does not stop the rest; the markdown table prints last.
# ROWS=3b:lora,3b:qlora:gc and SKIP_TESTS=1 narrow a second run; STEPS (10) and BUDGET (410 s) are settable.
set -u
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "wheel install failed: see pip.log"
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

ROWS=${ROWS:-1b:lora,1b:lora:gc,1b:qlora:gc,3b:lora,3b:qlora:gc}
# tests/gpu: at most 100 s
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 100 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest tests/gpu: rc $? ($(tail -1 "$OUT/pytest_gpu.txt"))" | tee -a "$OUT/summary.txt"
fi

# the rows: what is left of ~410 s, each side (or fixture) at most 110 s
LEFT=$(( ${BUDGET:-410} - ($(date +%s) - T0) ))
python3 benchmarks/bench_gpu.py table --rows "$ROWS" \
  --work /tmp/leantune-bench --steps "${STEPS:-10}" --warmup 2 --row-timeout 110 --deadline "$LEFT" \
  --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.txt"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/summary.txt"
