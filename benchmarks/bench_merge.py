"""Peak memory and time of merge-and-save: `leantune merge` against PEFT's merge_and_unload + save_pretrained.

The model is the demo's SmolLM2-135M (fp32 on disk, ~514 MB, one shard) with a random LoRA r16 on every
linear layer. Each side runs in its own process; peak RSS comes from the kernel (wait4), so it counts
everything the process touched (libraries included). Baseline: the RSS of a process that only imports
torch + transformers (+ peft), reported so the merge's own share can be read off.

    python benchmarks/bench_merge.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MAKE_ADAPTER = """
import sys, torch, warnings
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
warnings.simplefilter("ignore")
torch.manual_seed(0)
m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
m.save_pretrained(sys.argv[2])
"""

PEER = """
import sys, torch, warnings
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
warnings.simplefilter("ignore")
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3])
"""

IMPORTS = "import torch, transformers, peft, safetensors"


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode(errors="replace")  # read before waiting: a full pipe would block the child
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed: {err[-2000:]}")
    return time.perf_counter() - t, ru.ru_maxrss / 1024


def main() -> None:
    from leantune.models.demo_model import demo_model_dir

    base = str(demo_model_dir())
    size = sum(f.stat().st_size for f in Path(base).glob("*.safetensors")) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        adapter = f"{tmp}/adapter"
        run([sys.executable, "-c", MAKE_ADAPTER, base, adapter])
        rows = {"imports only": run([sys.executable, "-c", IMPORTS])}
        rows["leantune merge"] = run([sys.executable, "-m", "leantune.cli.main", "merge", adapter, "--out", f"{tmp}/ours"])
        rows["peft merge_and_unload"] = run([sys.executable, "-c", PEER, base, adapter, f"{tmp}/peer"])
    print(f"base: {base} ({size:.0f} MB of safetensors)")
    for name, (wall, rss) in rows.items():
        print(f"{name:24s} wall {wall:6.1f} s   peak RSS {rss:7.0f} MB")
    print(json.dumps({k: {"wall_s": round(w, 1), "peak_rss_mb": round(r)} for k, (w, r) in rows.items()}))


if __name__ == "__main__":
    main()
