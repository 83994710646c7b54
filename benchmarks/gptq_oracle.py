"""Our GPTQ (or AWQ) against llm-compressor's on SmolLM2-135M-Instruct (the demo model): held-out perplexity.

The same calibration rows for both (ours from export/calibration.py over the demo dataset's examples after
the first `--examples`, handed to the library as input_ids in safetensors), 4 bit, symmetric, group 128,
llm-compressor's default actorder "static" (= our act_order) or `--actorder none` (= our static_groups);
scales in float32 like the library keeps them. The library runs in its own interpreter
(tests/parity/oracle_llmcompressor.py, LEANTUNE_ORACLE_PYTHON or --oracle-python), at one thread; its
output is kept in --keep and reused when there. Both quantized models are scored on the same held-out
text (the first `--examples` demo chats + the built-in prose, as benchmarks/export_quality.py does) by
eval/compare.py, the function every fidelity report uses. Our default export (lazy grid, fp16 scales, no
act-order) is scored beside them. `--method awq`: our default AWQ against the library's AWQModifier with
its defaults (4-bit asymmetric, same group size), which runs on a CPU with one patch (see the oracle).
SmolLM2's hidden size 576 takes group 64, not 128 (576 / 128 is not whole; the library refuses it too).

    python -m benchmarks.gptq_oracle --keep /tmp/gptq_oracle [--method gptq|awq] [--actorder static|none]

Prints the perplexities, the ratio ours / library, and the share of equal weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--oracle-python", default=os.environ.get("LEANTUNE_ORACLE_PYTHON"))
    ap.add_argument("--keep", required=True, help="folder for the model, the rows and the library's output")
    ap.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    ap.add_argument("--actorder", choices=("static", "none"), default="static", help="GPTQ only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.export_quality import held_out_texts
    from leantune.eval.compare import compare, text_batches
    from leantune.export import wna16
    from leantune.export.calibration import calibration_rows
    from leantune.export import awq, gptq
    from leantune.infer.materialize import materialize
    from leantune.models.demo_model import demo_model_dir
    from leantune.quant import wna16 as packing

    torch.set_num_threads(args.threads)
    keep = Path(args.keep)
    keep.mkdir(parents=True, exist_ok=True)
    model, tok, _ = materialize(str(demo_model_dir()))
    model = model.float().eval()
    base = keep / "base"
    if not (base / "config.json").exists():
        model.save_pretrained(base)
        tok.save_pretrained(base)
    demo = ROOT / "leantune" / "assets" / "demo" / "train.jsonl"
    calib = keep / "calibration.jsonl"           # the demo examples the held-out text does not use
    calib.write_text("".join(demo.read_text(encoding="utf-8").splitlines(keepends=True)[args.examples:]))
    rows = calibration_rows(tok, file=str(calib), source=None).rows
    rows_path = keep / "rows.safetensors"
    save_file({"input_ids": rows.contiguous()}, str(rows_path))

    mode = "awq" if args.method == "awq" else args.actorder
    theirs_path = keep / f"theirs_{mode}_g{args.group_size}.safetensors"
    if not theirs_path.exists():
        if not args.oracle_python:
            raise SystemExit("set LEANTUNE_ORACLE_PYTHON or --oracle-python to a python with llmcompressor")
        t0, c0 = time.perf_counter(), _children_cpu()
        done = subprocess.run([args.oracle_python, str(ROOT / "tests/parity/oracle_llmcompressor.py"), str(base),
                               str(rows_path), str(theirs_path), str(args.group_size), mode],
                              capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(args.threads)})
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        print(f"llm-compressor {args.method}: {time.perf_counter() - t0:.0f} s wall, {_children_cpu() - c0:.0f} CPU-s "
              "(process start, model load and calibration forwards included)")
    theirs = {k: v for k, v in load_file(str(theirs_path)).items() if not k.startswith("hessian.")}

    def ours(**options) -> tuple[dict, float, float]:
        spec = wna16.Spec(args.method, 4, args.group_size, sym=args.method == "gptq", **options)
        solver = gptq.solve if args.method == "gptq" else awq.solve
        t0, c0 = time.perf_counter(), time.process_time()
        q = wna16.quantize_layers(model, rows, spec, lambda layer, walk: solver(layer, walk, spec), show=False)
        state = {f"{k}.weight": packing.dequantize(p.codes, p.scale, p.zero) for k, p in q.linears.items()}
        return state | q.overrides, time.perf_counter() - t0, time.process_time() - c0   # AWQ: the folded norms

    if args.method == "gptq":
        matching = {"act_order": True} if args.actorder == "static" else {"static_groups": True}
        mine, wall, cpu = ours(scale_dtype=torch.float32, **matching)
    default, dwall, dcpu = ours()
    if args.method == "awq":
        mine, wall, cpu = default, dwall, dcpu
    same = torch.cat([torch.isclose(mine[k], theirs[k], rtol=0, atol=1e-6).flatten() for k in mine if k in theirs])
    batches = text_batches(tok, held_out_texts(tok, args.examples))

    def score(state: dict) -> dict:
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(state, strict=False)
        with torch.no_grad():
            return compare(model, candidate, batches)

    s_ours, s_theirs, s_default = score(mine), score(theirs), score(default)
    ref = s_ours["perplexity_reference"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "method": args.method, "actorder": args.actorder if args.method == "gptq" else None, "group_size": args.group_size, "calibration": list(rows.shape),
              "held_out_tokens": s_ours["tokens"], "perplexity_float": ref,
              "perplexity_ours": s_ours["perplexity_candidate"], "perplexity_library": s_theirs["perplexity_candidate"],
              "ratio_ours_over_library": s_ours["perplexity_candidate"] / s_theirs["perplexity_candidate"],
              "kl_ours": s_ours["kl_mean"], "kl_library": s_theirs["kl_mean"],
              "equal_weights": float(same.float().mean()), "ours_seconds": [round(wall, 1), round(cpu, 1)],
              "perplexity_our_default": s_default["perplexity_candidate"], "kl_our_default": s_default["kl_mean"],
              "our_default_seconds": [round(dwall, 1), round(dcpu, 1)]}
    print(json.dumps(result, indent=1))
    print(f"held-out perplexity: float {ref:.3f}, ours {s_ours['perplexity_candidate']:.3f}, llm-compressor "
          f"{s_theirs['perplexity_candidate']:.3f} (ratio {result['ratio_ours_over_library']:.4f}); our default "
          f"export {s_default['perplexity_candidate']:.3f}; equal weights {result['equal_weights']:.2%}")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
