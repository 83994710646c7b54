#!/usr/bin/env bash
# One prepared run on a lent GPU (issue 17): install the carried wheels, run tests/gpu, then the 1.1B rows
# plain and with train.checkpoint_offload, train.kernels triton and train.compile (each next to its plain row),
# then a short CUDA profile of leantune. Everything lands under $OUT (device
# tool) or ./device-out, within ~300 s (BUDGET).
#
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=420)
#
# .whl holds bitsandbytes==0.50.2 and peft==0.21.2 (see docs/benchmarks.md for the download line). Each
# piece has its own timeout, so one failure does not stop the rest; the markdown table prints after the rows.
# Settable: ROWS (a compiled row reuses the peer time of its plain row), SKIP_TESTS=1, STEPS (12, of which 3 warm-up gaps),
# BUDGET (300 s for everything), PROFILE (the row to profile, 1b:lora:triton; empty skips it),
# PROFILE_STEPS (5). The 3B rows of docs/benchmarks.md: ROWS=3b:lora,3b:lora:compile,3b:qlora:gc,3b:qlora:gc:compile.
set -u
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET=${BUDGET:-300}
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

# the most telling pairs first: whatever runs out of time is at the end
ROWS=${ROWS:-1b:qlora:gc,1b:qlora:gc:offload,1b:qlora:gc:triton,1b:lora,1b:lora:triton,1b:qlora:gc:compile,1b:lora:compile}
PROFILE=${PROFILE-1b:lora:triton}
# tests/gpu: at most 90 s
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 90 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest tests/gpu: rc $? ($(tail -1 "$OUT/pytest_gpu.txt"))" | tee -a "$OUT/summary.txt"
fi

# the rows: what is left of BUDGET less ~45 s kept for the profile; each side (or fixture) at most 150 s
# (a compiled row pays its compile in the first step, and on CPU its steps 2-3 were still slow (1-2 s
# against 0.02 s after, no recompile): the 3 warm-up gaps keep all of it out of the median)
KEEP=$([ -n "$PROFILE" ] && echo 45 || echo 0)
LEFT=$(( BUDGET - ($(date +%s) - T0) - KEEP ))
python3 benchmarks/bench_gpu.py table --rows "$ROWS" \
  --work /tmp/leantune-bench --steps "${STEPS:-12}" --warmup 3 --row-timeout 150 --deadline "$LEFT" \
  --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.txt"

# a short profile of ours: top ops by self CUDA time (the inductor cache is warm from the rows above)
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
if [ -n "$PROFILE" ] && [ "$LEFT" -gt 25 ]; then
  IFS=: read -r SIZE MODE REST <<< "$PROFILE"
  FLAGS=""; [[ ":$REST:" == *:gc:* ]] && FLAGS+=" --gc"; [[ ":$REST:" == *:compile:* ]] && FLAGS+=" --compile"
  [[ ":$REST:" == *:triton:* ]] && FLAGS+=" --triton"; [[ ":$REST:" == *:offload:* ]] && FLAGS+=" --offload"
  BATCH=$([ "$SIZE" = 3b ] && echo 4 || echo 8)
  timeout "$LEFT" python3 benchmarks/bench_gpu.py ours --fx "/tmp/leantune-bench/fx-$SIZE" --mode "$MODE" $FLAGS \
    --batch "$BATCH" --steps "${PROFILE_STEPS:-5}" --warmup 1 --profile 30 > "$OUT/profile.txt" 2>&1
  echo "profile $PROFILE: rc $? ($(grep -m1 '^===' "$OUT/profile.txt"))" | tee -a "$OUT/summary.txt"
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/summary.txt"
