"""`leantune inspect-data` and `leantune preprocess`: the data as training sees it, and its token cache."""

from __future__ import annotations

import argparse
import textwrap

from .options import _overrides


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
    p.add_argument("--cache-dir", "--data.cache_dir", "--data.cache-dir", dest="cfg:data.cache_dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="where to write the cache (default: data.cache_dir, else ~/.cache/leantune/data)")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """The few flags inspect-data and preprocess take without a config file."""
    p.add_argument("--model", dest="cfg:model", default=argparse.SUPPRESS, metavar="MODEL",
                   help="model (for its tokenizer)")
    # Each also under the name `train` gives it (--data.path, ...), so a flag copied from a train line works here.
    p.add_argument("--data", "--data.path", dest="cfg:data.path", default=argparse.SUPPRESS, metavar="FILE",
                   help="data file, or a list of them: '[a.jsonl, b.txt]'")
    p.add_argument("--format", "--data.format", dest="cfg:data.format", default=argparse.SUPPRESS, metavar="FORMAT",
                   help="data format: auto, alpaca, chat, prompt_completion or text (default: auto)")
    p.add_argument("--max-length", "--data.max_length", "--data.max-length", dest="cfg:data.max_length",
                   default=argparse.SUPPRESS, metavar="INT",
                   help="max tokens per example")


def _data_config(ns: argparse.Namespace):
    from .. import config as config_mod
    from ..errors import ConfigError

    cfg = config_mod.load(ns.config, _overrides(ns), validate=False)  # paths relative to the file, as in train
    if not cfg.model or not (cfg.data.path or cfg.data.sources):
        raise ConfigError(f"{ns.command} needs a model (for its tokenizer) and data: pass a config, or --model and --data")
    config_mod.check_data(cfg.data)
    return cfg


def _wrap(text: str) -> str:
    # Wrapped at spaces only: a cache path is printed whole, so it can be copied from the terminal.
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def _inspect(ns: argparse.Namespace) -> int:
    cfg = _data_config(ns)
    from ..data.dataset import build
    from ..data.inspect import render_examples
    from ..models.load import load_tokenizer

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = build(cfg.data, tok, seed=cfg.seed)
    print(render_examples(prepared.train, tok, ns.num))
    print(_wrap(prepared.report.summary()))
    return 0


def _preprocess(ns: argparse.Namespace) -> int:
    cfg = _data_config(ns)
    from ..data.dataset import build
    from ..models.load import load_tokenizer

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prepared = build(cfg.data, tok, seed=cfg.seed, save_cache=True)
    print(_wrap(prepared.report.summary()))
    return 0
