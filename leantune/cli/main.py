"""The `leantune` command. Parses arguments, builds a validated config, calls the library.

Heavy libraries (torch, transformers) are imported only inside the subcommand that runs, so
`leantune --help` and `leantune train --help` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from .. import __version__
from ..errors import LeantuneError

EPILOG_TRAIN = """\
examples:
  leantune train my.yaml                         # the whole run from one file
  leantune train my.yaml --lora.rank 8 --train.lr 1e-4
  leantune train --model ./my-model --data.path train.jsonl --output_dir runs/first
  leantune train runs/first/config.yaml --resume # continue after a crash or Ctrl-C
  leantune train my.yaml --nproc 2               # 2 processes on this machine (torchrun; docs/distributed.md)
  torchrun --nproc-per-node 4 -m leantune train my.yaml --distributed.strategy fsdp2

a minimal config file:
  model: ./SmolLM2-135M-Instruct        # local HF folder, hub id, or .gguf file
  output_dir: runs/first
  data: {path: train.jsonl}             # alpaca, chat messages, prompt/completion or text records
  lora: {rank: 16, alpha: 32}
  train: {epochs: 2, lr: 2.0e-4}
"""

EPILOG_PLAN = """\
examples:
  leantune plan meta-llama/Llama-3.1-8B --gpu 24GB --seq 2048 --batch 4   # a hub id: reads config.json only
  leantune plan ./Qwen2.5-7B --gpu "RTX 4090"       # a local folder (or its config.json)
  leantune plan my.yaml                               # the config you would train, on this machine
  leantune plan my.yaml --fit --gpu "RTX 4090"        # plus the train flags that make it fit
  leantune plan my.yaml --json                        # the same table, machine-readable

reading the table: peak is the most memory a training step holds (torch's max_memory_allocated on a GPU,
the process's resident set on a CPU); "ok" means it fits with 1 GiB left for the CUDA context. The
breakdown and the error of each prediction against measured runs are in docs/plan.md.
"""


def _add_config_fields(p: argparse.ArgumentParser) -> None:
    """One flag per config field; the methods' sections are those registered, or for `--help` alone
    the light table of the built-in ones (cli/method_help.py), so help never waits for torch."""
    from .method_help import help_fields

    fields, section_titles = help_fields()
    groups: dict[str, argparse._ArgumentGroup] = {}
    titles = {"": "run", "data": "data (data.*)", "train": "training loop (train.*)",
              "galore": "GaLore optimizer (galore.*)", "quant": "quantized base, QLoRA (quant.*)",
              "distributed": "several processes under torchrun (distributed.*)", **section_titles}
    for name, tname, default, help in fields:
        section = name.split(".")[0] if "." in name else ""
        g = groups.get(section) or groups.setdefault(section, p.add_argument_group(titles.get(section, section)))
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        default = "null" if default is None else default
        g.add_argument(*flags, dest=f"cfg:{name}", metavar=tname.upper().replace(" ", "_")
                       if "|" not in tname else "{" + tname.replace("|", ",") + "}",
                       default=argparse.SUPPRESS, help=f"{help} (default: {default})".replace("%", "%%"))


def _overrides(ns: argparse.Namespace) -> dict:
    import yaml

    from ..config import fields_of

    types = {fi.name: fi.type for fi in fields_of()}
    out = {}
    for k, v in vars(ns).items():
        if not k.startswith("cfg:"):
            continue
        name = k[4:]
        if types.get(name) in (str, str | None) and isinstance(v, str):
            # Text stays text: "You are #1" is no YAML comment and "no" no boolean.
            out[name] = None if v in ("null", "~") else v
            continue
        # Everything else reads as in the file: lists ([q_proj, v_proj]), null, numbers, booleans.
        try:
            out[name] = yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            out[name] = v
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to the subcommand's own help and suggest its closest option."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given them, so the hint is its --help and its options
            sub = next((a.choices.get(getattr(ns, a.dest, None)) for a in self._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            (sub or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str):  # type: ignore[override]
        import difflib

        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", usage="leantune train [CONFIG] [--section.field VALUE ...] [--resume]", help="fine-tune a model from a YAML config (every field overridable here)",
                       description="Fine-tune a causal LM: LoRA (rsLoRA, LoRA+), DoRA, IA3, prompt or prefix tuning, "
                       "bottleneck adapters, full or freeze fine-tuning (method:), over a 16-bit or a 4/8-bit base "
                       "(quant.bits: QLoRA). Every config field can be set in the YAML file or overridden here as "
                       "--section.field VALUE.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (optional when --model and --data.path are given)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--max-steps", dest="cfg:train.max_steps", default=argparse.SUPPRESS, metavar="INT",
                   help="shorthand for --train.max_steps")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine: starts `torchrun --standalone --nproc-per-node N -m "
                   "leantune train ...` with the other arguments (each process trains train.batch_size rows per "
                   "micro-batch; see distributed.*). Several machines: run torchrun yourself (docs/distributed.md)")
    p.add_argument("--fit", dest="cfg:train.auto_fit", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="shorthand for --train.auto_fit true: the planner sizes batch, accumulation and checkpointing "
                   "to this device's memory (or --train.fit_memory 6GB) before the run")
    _add_config_fields(p)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with a base model plus an adapter (a prompt or a chat)",
                       description="Generate text from a run folder, an adapter folder or a plain model.",
                       epilog="examples:\n  leantune generate runs/first --prompt 'What is LoRA?'\n"
                       "  leantune generate runs/first --chat          # interactive chat\n"
                       "  leantune generate runs/first --no-adapter --prompt 'Hi'   # the base model alone",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder (uses its adapter/), an adapter folder, or a model")
    p.add_argument("--base", help="base model, when it differs from the one recorded in the adapter")
    p.add_argument("--prompt", action="append", help="a user message (repeat for several prompts)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (type /exit to leave)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--no-adapter", action="store_true", help="ignore the adapter: the base model alone")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="base weights dtype (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--quant-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the base to 4 or 8 bits (default: as the run that trained the adapter)")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base (an HF model folder), or merge adapters by a recipe",
                       description="Fold a run's adapter (LoRA, DoRA or IA3) into its base and write a plain Hugging "
                       "Face model folder with merge_report.json, or combine several adapters as a YAML recipe says (linear, cat, svd, ties, dare_linear, "
                       "dare_ties, magnitude_prune).",
                       epilog="examples:\n  leantune merge runs/first --out merged/first\n"
                       "  leantune merge runs/qlora --out merged/q --base original   # the 16-bit weights\n"
                       "  leantune merge recipe.yaml                                # see docs/merging.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, an adapter folder, or a recipe .yaml")
    p.add_argument("--out", help="output folder, new or empty; a recipe may name it instead")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier leantune output "
                   "(a folder with any other file in it is never replaced)")
    p.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                   help="QLoRA runs: merge into dequant(4-bit weights), what the adapter trained against, or into "
                   "the original 16-bit weights (default: dequantized)")
    p.add_argument("--base-model", help="base model, when it differs from the one recorded in the adapter")
    p.add_argument("--eval-batches", type=int, default=4, help="QLoRA runs: held-out batches for merge_report.json "
                   "(default: 4)")
    p.add_argument("--no-report", action="store_true", help="QLoRA runs: skip measuring the merge's cost")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the built-in small real model on this machine (offline, CPU)",
                       description="Fine-tunes a LoRA on SmolLM2-135M-Instruct with the built-in dataset and "
                       "prints the same prompts before and after. Needs no network.")
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default: runs/demo; replaced if it exists)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's tuned value)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (fast smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inspect_data(sub) -> None:
    p = sub.add_parser("inspect-data", help="render N examples the way training sees them, marking trained tokens",
                       description="Tokenizes a dataset exactly as `train` would and shows which tokens are trained "
                       "([[...]] marks trained tokens), with counts of BOS/EOS per example.")
    p.add_argument("config", nargs="?", help="YAML config file (its model and data sections are used)")
    p.add_argument("-n", "--num", type=int, default=3, help="examples to show (default: 3)")
    _add_data_flags(p)


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize the data once and cache it; train and inspect-data then read the cache",
                       description="Tokenizes every data source exactly as `train` would and writes the tokens to the\n"
                       "cache (data.cache_dir). A run reads them instead of tokenizing again whenever the data\n"
                       "files, the tokenizer and the data settings are unchanged; anything else is a miss, never\n"
                       "stale data.",
                       epilog="examples:\n  leantune preprocess my.yaml\n"
                       "  leantune preprocess --model ./SmolLM2-135M-Instruct --data train.jsonl --cache-dir .cache/data",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (its model and data sections are used)")
    _add_data_flags(p)
    p.add_argument("--cache-dir", dest="cfg:data.cache_dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="where to write the cache (default: data.cache_dir, else ~/.cache/leantune/data)")


def _add_export(sub) -> None:
    from ..export.base import available, quant_help  # a light name table: no exporter is imported

    p = sub.add_parser("export", help="write a model or a run (its adapter merged, or alone) as GGUF or INT8 (or --all), "
                       "with a fidelity report",
                       description="Write a model or a run (LoRA, DoRA or IA3 merged into its base) in a serving "
                       "format: GGUF for llama.cpp / Ollama / LM Studio (k-quants in pure Python); INT8 as "
                       "weight-only W8A16 in compressed-tensors (vLLM, transformers) or LLM.int8 (bitsandbytes, "
                       "transformers). Beside each, <name>.fidelity.json: held-out perplexity, KL and greedy top-1 "
                       "agreement against the unquantized model, size, bits/weight, time and peak memory.",
                       epilog="examples:\n  leantune export runs/first --quant Q4_K_M --modelfile\n"
                       "  leantune export ./SmolLM2-135M --quant Q8_0 --out smol.gguf\n"
                       "  leantune export runs/first --format int8                # W8A16 folder for vLLM/transformers\n"
                       "  leantune export runs/first --format int8 --quant llm_int8   # bitsandbytes LLM.int8\n"
                       "  leantune export runs/first --all     # every format into runs/first/export/, one table\n"
                       "  leantune export runs/first --adapter-only     # a GGUF LoRA for llama.cpp --lora",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, an adapter folder, an HF model folder or a .gguf file")
    p.add_argument("--format", default=None, metavar="NAME",  # checked by export.base.get: one line naming the choices
                   help=f"output format: {', '.join(available())} (default: gguf)")
    p.add_argument("--all", action="store_true", help="every format (each one's default quant, GGUF Q8_0 and Q4_K_M, "
                   "INT8 W8A16 and LLM_INT8) into one folder (--out; default <run>/export or ./<name>-export), one "
                   "fidelity table at the end and export_all.json; a failed format is a row of the table; rerun "
                   "to resume (finished formats are kept); exit 1 if any format failed")
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
                   "squared input over this calibration data (any training data file), as llama-quantize --imatrix")
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


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak memory and step time of every method before training; recommend one that fits",
                       description="Plans a fine-tuning run from the model's config.json alone (no weights): for each "
                       "method, the predicted peak memory with and without gradient checkpointing, a breakdown, the "
                       "peaks outside the step (eval, save, merge, export) and a step time from FLOPs; then the "
                       "cheapest configuration that fits the device. Error against measured runs: docs/plan.md.",
                       epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a model folder, its config.json, a hub id (reads config.json only), a .gguf file, "
                   "`demo`, or a leantune YAML config (its model, method, quant, data.max_length and train.* are used)")
    p.add_argument("--gpu", help="a card by name ('RTX 4090', H100, 'A100 40GB') or a memory size (24GB); "
                   "default: this machine's GPU, else its CPU and RAM")
    p.add_argument("--seq", type=int, help="tokens per row (default: data.max_length of the config, else 1024)")
    p.add_argument("--batch", type=int, help="rows per micro-batch (default: train.batch_size, else 4)")
    p.add_argument("--method", choices=["lora", "dora", "ia3", "bottleneck", "prompt", "prefix", "full", "freeze"],
                   help="the method to recommend a configuration for (default: the config's, else lora)")
    p.add_argument("--tflops", type=float, help="the device's matmul TFLOP/s, for the step time (default: the GPU "
                   "table, or a quick matmul probe on a CPU)")
    p.add_argument("--fit", action="store_true", help="also print the train flags (batch, accumulation, "
                   "checkpointing, optimizer, quant) of the recommended configuration")
    p.add_argument("--json", action="store_true", help="the same plan as JSON")


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, device, bf16 support and bitsandbytes' state; warn on untested versions",
                       description="Checks this environment against the versions leantune was tested with "
                       "(leantune/assets/constraints.txt), reports the device and whether it computes bf16 in "
                       "hardware, and runs a 4-bit round trip through bitsandbytes' kernels. Exit 1 when a check fails.")
    p.add_argument("--json", action="store_true", help="the same report as JSON")


def _add_lint(sub) -> None:
    p = sub.add_parser("lint", help="check an adapter, a run or a train config against vLLM's and llama.cpp's rules",
                       description="Checks what vLLM and llama.cpp refuse or serve wrong (DoRA, modules_to_save,\n"
                       "biases, base-rewriting inits, ranks above 512, one GGUF alpha per file), reading only\n"
                       "adapter_config.json and the safetensors header. A train config is checked as its\n"
                       "deploy_targets are before training. Exit 0: no errors (warnings are printed);\n"
                       "2: errors, each naming the conflicting option and the fix.",
                       epilog="examples:\n  leantune lint runs/first                      # vLLM and llama.cpp\n"
                       "  leantune lint runs/first/adapter --target vllm --json\n"
                       "  leantune lint my.yaml --target llamacpp      # before training\n"
                       "  leantune lint legal=runs/legal support=runs/support --vllm-command   # the vllm serve line",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="an adapter folder, a run folder or a train config "
                   ".yaml; NAME=PATH names an adapter for --vllm-command (default: the folder's name)")
    p.add_argument("--target", choices=["vllm", "llamacpp", "all"], default="all", help="the runtime (default: all)")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    p.add_argument("--vllm-command", action="store_true", help="print the `vllm serve` command that serves these "
                   "adapters on their base (--max-lora-rank from their ranks); refused while an adapter has errors")
    p.add_argument("--base", help="--vllm-command: the base model (default: the one the adapters record)")
    p.add_argument("--max-loras", type=int, help="--vllm-command: adapters in one batch (default: all of them)")
    p.add_argument("--host", default="127.0.0.1", help="--vllm-command: the address vLLM binds (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="--vllm-command: the port (default: 8000)")


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="open the local web page: the methods guide, the planner, your runs' live curves",
                       description="Serves one page on this machine (no internet, no CDN): a guide to the "
                       "fine-tuning and quantization techniques, the planner as a form with a chart per method, "
                       "and every run folder under --root with live loss curves, memory, data report and "
                       "checkpoints, two runs side by side. docs/ui.md tells more.",
                       epilog="examples:\n  leantune ui                      # runs under ./runs, http://127.0.0.1:7860/\n"
                       "  leantune ui --root ~/runs --port 8080\n"
                       "  leantune ui --serve http://127.0.0.1:8000 --api-key \"$KEY\"   # the Chat tab talks to leantune serve",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs", help="folder whose run folders the page lists (default: runs)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 shows your runs to the network)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    p.add_argument("--serve", metavar="URL", help="a `leantune serve` server for the Chat tab, e.g. http://127.0.0.1:8000: "
                   "the page's /v1/* is proxied to it (without it, the tab shows the command that starts one)")
    p.add_argument("--api-key", help="the server's --api-key; added by the proxy, never sent to the browser")



EPILOG_SERVE = """\
examples:
  leantune serve ./SmolLM2-135M --adapters runs/     # every finished run under runs/ is a model name
  leantune serve runs/legal runs/support --port 8000 --api-key "$KEY" --max-loras 8
  leantune serve ./model legal=runs/legal/adapter   # NAME=PATH names an adapter yourself
  curl localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
       -d '{"model": "legal", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

"model" in a request picks the adapter; the base's own name (as given, or --served-model-name) means none.
Any OpenAI client works: base_url=http://127.0.0.1:8000/v1. Routes, limits and metrics: docs/serve.md.
"""


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base, many adapters, batched together",
                       description="Serve a base model and any number of LoRA/DoRA adapters over HTTP "
                       "(/v1/chat/completions, /v1/completions, /v1/models, /metrics). Requests for different "
                       "adapters run in one batch; adapters beyond --max-loras are swapped in from disk.",
                       epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="the base model, and/or run folders / adapter folders / NAME=PATH to serve by name")
    p.add_argument("--adapters", metavar="DIR", help="serve every finished run under DIR (by folder name); "
                   "/v1/load_lora_adapter loads only from inside DIR")
    p.add_argument("--base", help="the base model, when the adapters name another (or none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                   "(default: $LEANTUNE_API_KEY, else none)")
    p.add_argument("--max-loras", type=int, default=8, help="adapters resident at once, in one batch (default: 8)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in CPU memory; beyond it they are read from disk again (default: --max-loras)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)")
    p.add_argument("--max-tokens", type=int, default=1024, help="cap on a request's max_tokens (default: 1024)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429 (default: 64)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="cap on a request body (default: 1 MiB)")
    p.add_argument("--served-model-name", help="the base's model name in requests (default: the base as given)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="base weights dtype (default: auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--engine", choices=["leantune", "vllm"], default="leantune",
                   help="leantune: serve here (default); vllm: print the `vllm serve` command for the same adapters "
                   "after checking them against vLLM's rules (exit 2 when it would refuse one)")
    p.add_argument("--print", action="store_true", help="with --engine vllm: print the command (what it always does)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")


SUBCOMMANDS = (_add_train, _add_generate, _add_merge, _add_demo, _add_inspect_data, _add_preprocess, _add_export, _add_plan,
               _add_serve, _add_lint, _add_ui, _add_doctor)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leantune",
        description="Lean, faithful fine-tuning of open LLMs: LoRA adapters that PEFT and vLLM load unchanged.",
        epilog="Run `leantune demo` first: it fine-tunes a small real model on this machine, offline.",
    )
    parser.add_argument("--version", action="version", version=f"leantune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# The subcommands that read a run config: they need every method's section, which registers as the methods'
# files are imported (with torch). The others, and `leantune --help`, never pay that import.
CONFIG_COMMANDS = ("train", "inspect-data", "preprocess")


def _load_methods(argv: list[str]) -> None:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in CONFIG_COMMANDS and not {"-h", "--help"} & set(argv):  # help reads the light table
        from .. import adapters  # noqa: F401  (registration happens on import)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """The few flags inspect-data and preprocess take without a config file."""
    p.add_argument("--model", dest="cfg:model", default=argparse.SUPPRESS, metavar="MODEL",
                   help="model (for its tokenizer)")
    p.add_argument("--data", dest="cfg:data.path", default=argparse.SUPPRESS, metavar="FILE",
                   help="data file, or a list of them: '[a.jsonl, b.txt]'")
    p.add_argument("--format", dest="cfg:data.format", default=argparse.SUPPRESS, metavar="FORMAT",
                   help="data format: auto, alpaca, chat, prompt_completion or text (default: auto)")
    p.add_argument("--max-length", dest="cfg:data.max_length", default=argparse.SUPPRESS, metavar="INT",
                   help="max tokens per example")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _load_methods(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        if ns.command == "train":
            return _train(ns, argv)
        if ns.command == "generate":
            from .chat import main as generate_main

            return generate_main(ns)
        if ns.command == "merge":
            return _merge(ns)
        if ns.command == "demo":
            from ..demo import run_demo

            return run_demo(output_dir=ns.output_dir, steps=ns.steps, layers=ns.layers, quiet=ns.quiet)
        if ns.command == "inspect-data":
            return _inspect(ns)
        if ns.command == "preprocess":
            return _preprocess(ns)
        if ns.command == "export":
            return _export(ns)
        if ns.command == "plan":
            return _plan(ns)
        if ns.command == "ui":
            from ..ui.server import serve

            return serve(ns.root, host=ns.host, port=ns.port, quiet=ns.quiet, serve_url=ns.serve, api_key=ns.api_key)
        if ns.command == "serve":
            from ..serve.server import serve

            return serve(ns)
        if ns.command == "doctor":
            from .doctor import main as doctor_main

            return doctor_main(as_json=ns.json)
        if ns.command == "lint":
            from .lint import main as lint_main

            return lint_main(ns)
    except LeantuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # SIGTERM arrives as Terminated where train handles it (io/faults.py)
        from ..io.faults import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    return 0


def _train(ns: argparse.Namespace, argv: list[str]) -> int:
    from .. import config as config_mod

    if ns.nproc is not None:
        return _spawn_torchrun(ns.nproc, argv)

    cfg = config_mod.load(ns.config, _overrides(ns))
    from ..plan.fit import prepare
    from ..train.loop import run

    fit = prepare(cfg, resume=ns.resume)  # train.auto_fit: sized by the planner before anything loads
    res = run(cfg, resume=ns.resume, fit=fit)
    return {"interrupted": 130, "terminated": 143}.get(res.stopped, 0)  # as io/faults.py EXIT_*


def _spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: the same command under torchrun, N processes on this machine (a free port each time)."""
    import os
    import subprocess

    from ..errors import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--nproc inside a torchrun job would start torchrun again; drop --nproc")
    rest, skip = [], False
    for a in argv:  # the arguments less --nproc N / --nproc=N
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "leantune", *rest]
    print("running: torchrun " + " ".join(cmd[3:]), flush=True)
    return subprocess.call(cmd)


def _plan(ns: argparse.Namespace) -> int:
    import json

    from ..plan import make_plan, render

    plan = make_plan(ns.source, gpu=ns.gpu, seq=ns.seq, batch=ns.batch, method=ns.method, tflops=ns.tflops)
    print(json.dumps(plan.as_dict(), indent=1) if ns.json else render(plan, fit=ns.fit, source=ns.source))
    return 0


def _merge(ns: argparse.Namespace) -> int:
    if ns.source.endswith((".yaml", ".yml")):
        from ..merge.recipe import run_recipe

        run_recipe(ns.source, out=ns.out, overwrite=ns.overwrite)
        return 0
    from ..errors import ConfigError
    from ..merge.run import main as merge_main

    if not ns.out:
        raise ConfigError("leantune merge needs --out DIR, the folder to write the merged model to")
    return merge_main(ns)


def _data_config(ns: argparse.Namespace):
    from .. import config as config_mod
    from ..errors import ConfigError

    cfg = config_mod.load(ns.config, _overrides(ns), validate=False)  # paths relative to the file, as in train
    if not cfg.model or not (cfg.data.path or cfg.data.sources):
        raise ConfigError(f"{ns.command} needs a model (for its tokenizer) and data: pass a config, or --model and --data")
    config_mod.check_data(cfg.data)
    return cfg


def _inspect(ns: argparse.Namespace) -> int:
    cfg = _data_config(ns)
    from ..data.dataset import build
    from ..data.inspect import render_examples
    from ..models.load import load_tokenizer

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = build(cfg.data, tok, seed=cfg.seed)
    print(render_examples(prepared.train, tok, ns.num))
    print(textwrap.fill(prepared.report.summary(), width=100))
    return 0


def _preprocess(ns: argparse.Namespace) -> int:
    cfg = _data_config(ns)
    from ..data.dataset import build
    from ..models.load import load_tokenizer

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = build(cfg.data, tok, seed=cfg.seed, save_cache=True)
    print(textwrap.fill(prepared.report.summary(), width=100))
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
