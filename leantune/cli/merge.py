"""`leantune merge`: fold a run's adapter into its base, or merge adapters by a recipe."""

from __future__ import annotations

import argparse
import os


class _BaseAction(argparse.Action):
    """`--base` names the base model, as in every other subcommand. Before `--merge-base` existed, merge's
    `--base dequantized|original` picked the QLoRA merge target: those two words still do, unless a folder of
    that name exists here (then `./original` and `original` both name the folder)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value in ("dequantized", "original") and not os.path.exists(value):
            namespace.merge_base = value
        else:
            namespace.base_model = value


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base (an HF model folder), or merge adapters by a recipe",
                       description="Fold a run's adapter (LoRA, DoRA or IA3) into its base and write a plain Hugging "
                       "Face model folder with merge_report.json, or combine several adapters as a YAML recipe says (linear, cat, svd, ties, dare_linear, "
                       "dare_ties, magnitude_prune).",
                       epilog="examples:\n  leantune merge runs/first --out merged/first\n"
                       "  leantune merge runs/qlora --out merged/q --merge-base original   # the 16-bit weights\n"
                       "  leantune merge recipe.yaml                                # see docs/merging.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, an adapter folder, or a recipe .yaml")
    p.add_argument("--out", help="output folder, new or empty; a recipe may name it instead")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier leantune output "
                   "(a folder with any other file in it is never replaced)")
    p.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                   help="QLoRA runs: merge into dequant(4-bit weights), what the adapter trained against, or into "
                   "the original 16-bit weights (default: dequantized)")
    p.add_argument("--base", dest="base_model", action=_BaseAction, metavar="BASE",
                   help="base model, when it differs from the one recorded in the adapter (as in export, generate, "
                   "serve and lint)")
    p.add_argument("--base-model", dest="base_model", help=argparse.SUPPRESS)  # this flag's earlier name
    p.add_argument("--eval-batches", type=int, default=4, help="QLoRA runs: held-out batches for merge_report.json "
                   "(default: 4)")
    p.add_argument("--no-report", action="store_true", help="QLoRA runs: skip measuring the merge's cost")


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
