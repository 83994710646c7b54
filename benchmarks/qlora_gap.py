"""Where QLoRA's held-out loss goes, on the demo data (companion to qlora_quality.py).

    tokens RUN_A RUN_B   per-token held-out loss of two trained runs (e.g. a LoRA and a QLoRA run that
                         qlora_quality.py left in its --workdir), split into the tokens of the answer's
                         value ({"answer": "<these>", ...}: facts the base must know) and all the rest
                         (JSON structure, topic, end of turn: what the fine-tuning teaches)
    layers RUN           evaluate a run trained on the 16-bit base over bases whose Linear weights are
                         NF4-rounded (quantize, dequantize) in groups (each projection type, the first and
                         last layers): which weights' rounding costs the held-out loss

    python benchmarks/qlora_gap.py tokens WORK/run-0-seed0 WORK/run-1-seed0
    python benchmarks/qlora_gap.py layers WORK/run-0-seed0
"""

from __future__ import annotations

import argparse
import re

import torch
import yaml


def _run(run_dir: str):
    from leantune.config import from_dict
    from leantune.data.dataset import build
    from leantune.infer.generate import load_for_inference

    with open(f"{run_dir}/config.yaml") as f:
        cfg = from_dict(yaml.safe_load(f))
    model, tok = load_for_inference(run_dir, dtype="fp32", device="cpu")
    return cfg, model, tok, build(cfg.data, tok, cfg.seed).eval


def token_split(run_dir: str) -> dict:
    _, model, tok, examples = _run(run_dir)
    key = '"answer": "'
    out = {"answer value": [0.0, 0], "rest": [0.0, 0]}
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), reduction="none", ignore_index=-100)
        pos = [i for i in range(1, len(ex.labels)) if ex.labels[i] != -100]
        starts, text = [], ""
        for i in pos:  # where each label token starts in the decoded answer
            starts.append(len(text))
            text = tok.decode([ex.input_ids[j] for j in pos if j <= i])
        a0, a1 = text.find(key), text.find('", "topic"')
        for s, i in zip(starts, pos):
            part = "answer value" if a0 >= 0 and a0 + len(key) <= s < a1 else "rest"
            out[part][0] += float(nll[i - 1])
            out[part][1] += 1
    return out


def layer_groups(run_dir: str) -> None:
    import bitsandbytes.functional as F

    from leantune.train.step import evaluate
    from leantune.data.dataset import batches

    cfg, model, tok, examples = _run(run_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    plan = batches(examples, batch_size=4, max_length=cfg.data.max_length, packing=cfg.data.packing, pad_id=pad,
                   seed=cfg.seed, epoch=0)
    linears = {n: m for n, m in model.named_modules()
               if type(m) is torch.nn.Linear and "lora_" not in n and m is not model.get_output_embeddings()}
    original = {n: m.weight.data.clone() for n, m in linears.items()}

    def rounded(w):
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return F.dequantize_4bit(q, state)

    def loss_with(pick) -> float:
        for n, m in linears.items():
            m.weight.data = rounded(original[n]) if pick(n) else original[n]
        with torch.no_grad():
            return evaluate(model, plan, chunk=1024)["eval_loss"]

    def layer(n: str) -> int:
        return int(re.search(r"layers\.(\d+)\.", n).group(1))

    last = max(layer(n) for n in linears)
    base = loss_with(lambda n: False)
    print(f"{'16-bit base (as trained)':28s} {base:.4f}")
    groups = {"every Linear": lambda n: True}
    for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        groups[t] = (lambda t: lambda n: f".{t}." in f"{n}.")(t)
    groups["layers 0-2"] = lambda n: layer(n) < 3
    groups[f"layers {last - 2}-{last}"] = lambda n: layer(n) > last - 3
    groups["all but the first and last"] = lambda n: layer(n) not in (0, last)
    for name, pick in groups.items():
        loss = loss_with(pick)
        print(f"{name + ' in NF4':28s} {loss:.4f} {loss / base - 1:+.1%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokens", help="answer-value tokens against the rest, for each run")
    t.add_argument("runs", nargs="+")
    la = sub.add_parser("layers", help="which NF4-rounded weights cost held-out loss")
    la.add_argument("run")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.what == "layers":
        layer_groups(a.run)
        return
    print(f"{'run':40s} {'mean':>7s} {'answer value: tokens, nats/token':>34s} {'rest: tokens, nats/token':>26s}")
    for run in a.runs:
        o = token_split(run)
        n = sum(v[1] for v in o.values())
        mean = sum(v[0] for v in o.values()) / n
        av, rest = o["answer value"], o["rest"]
        print(f"{run[-40:]:40s} {mean:7.4f} {av[1]:>22d} {av[0] / max(av[1], 1):11.4f} "
              f"{rest[1]:>14d} {rest[0] / max(rest[1], 1):11.4f}")


if __name__ == "__main__":
    main()
