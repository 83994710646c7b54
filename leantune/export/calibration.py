"""Calibration data for the quantizers that look at activations (GPTQ, AWQ), and the layer-by-layer walk
that feeds it through a decoder one layer at a time.

Where the tokens come from, deterministically:
  * --calibration FILE (.jsonl, .json, .csv, .parquet, .txt; any format `leantune train` reads), else
  * the run's own training data (its config.yaml's data sources, read and tokenized as training did).
Every example's tokens, in file order, are joined into one stream and cut into `samples` rows of `seq`
tokens (fewer rows when the data is short; one shorter row when it is shorter than `seq`).

The walk (`LayerWalk`): the embeddings run once on every row; the first decoder layer's inputs are
caught there (the hidden states and the keyword arguments the model passes its layers: position
embeddings, mask); then each layer in turn is handed to the quantizer, and its *quantized* outputs
become the next layer's inputs, so later layers are solved against what the quantized model will feed
them. Only one layer's activations are held: peak memory is about the model plus one layer's worth.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.run_folder import run_folder_of
from ..config import DataConfig, load
from ..data.dataset import build
from ..data.formats import SkipExample
from ..data.records import read_records
from ..data.tokenize import tokenize_example
from ..errors import ConfigError, DataError

DEFAULT_SAMPLES = 16                    # 16 x 128 tokens: SmolLM2-135M in 1.5 (GPTQ) to 2 (AWQ) minutes here
DEFAULT_SEQ = 128
BATCH = 8                                  # rows per forward pass through a layer


@dataclass
class Calibration:
    rows: torch.Tensor                     # (samples, seq) token ids
    source: str                            # where they came from, for the report

    def describe(self) -> str:
        n, t = self.rows.shape
        return f"{n} x {t} tokens from {self.source}"


def calibration_rows(tokenizer, *, file: str | None, source: str | None, samples: int = DEFAULT_SAMPLES,
                     seq: int = DEFAULT_SEQ) -> Calibration:
    """The calibration rows (see the module docstring). One line naming the fix when there are none."""
    if samples < 1 or seq < 2:
        raise ConfigError(f"--calibration-samples must be >= 1 and --calibration-seq >= 2 (got {samples}, {seq})")
    if file:
        stream, where = _file_tokens(tokenizer, file), str(file)
    else:
        stream, where = _run_tokens(tokenizer, source)
    if len(stream) < 2:
        raise DataError(f"the calibration data ({where}) holds no text; pass --calibration with a file of "
                        "examples like the ones the model will see")
    seq = min(seq, len(stream))
    n = min(samples, len(stream) // seq)
    rows = torch.tensor(stream[: n * seq], dtype=torch.long).reshape(n, seq)   # (samples, seq)
    return Calibration(rows, where)


def _file_tokens(tokenizer, file: str) -> list[int]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"--calibration {file} does not exist; pass a .jsonl or .txt file of examples")
    cfg = DataConfig()
    stream: list[int] = []
    for i, record in enumerate(read_records(path)):
        try:
            stream += tokenize_example(record, "auto", tokenizer, cfg, i).input_ids
        except SkipExample:
            continue
    return stream


def _run_tokens(tokenizer, source: str | None) -> tuple[list[int], str]:
    run = run_folder_of(source) if source else None
    if run is None:
        raise DataError(f"{source or 'the source'} is not a leantune run, so it has no training data to "
                        "calibrate on; pass --calibration data.jsonl (a few hundred examples like the model's inputs)")
    cfg = load(run.config, validate=False)
    prepared = build(cfg.data, tokenizer, seed=cfg.seed)
    stream = [t for ex in prepared.train for t in ex.input_ids]
    return stream, f"the run's training data ({run.config})"


class _Caught(Exception):
    """Raised by the hook on the first decoder layer: the inputs are caught, the rest of the model is skipped."""


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no model.layers; GPTQ/AWQ export supports decoder-only "
                          "models laid out like Llama (Llama, Mistral, Qwen2/3, Gemma, Phi-3)")
    return layers


class LayerWalk:
    """Decoder layers one at a time, each with its calibration inputs (see the module docstring)."""

    def __init__(self, model, rows: torch.Tensor, batch: int = BATCH):
        self.model = model
        self.layers = decoder_layers(model)
        self.inputs: list[torch.Tensor] = []           # per batch: (b, seq, hidden)
        self.kwargs: list[dict] = []                   # per batch: what the model passes every layer
        first = self.layers[0]

        def catch(module, args, kwargs):
            self.inputs.append(args[0] if args else kwargs.pop("hidden_states"))
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Caught

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for b in range(0, rows.shape[0], batch):
                    try:
                        model(input_ids=rows[b:b + batch], use_cache=False)
                    except _Caught:
                        pass
        finally:
            handle.remove()

    @torch.no_grad()
    def run(self, layer) -> list[torch.Tensor]:
        """`layer` on every batch of the current inputs: its outputs."""
        outs = []
        for x, kw in zip(self.inputs, self.kwargs):
            y = layer(x, **kw)
            outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    def __iter__(self) -> Iterator[tuple[int, torch.nn.Module]]:
        """(index, layer) in order. Before the next step the inputs move on through the layer, or through
        the quantized copy the caller named with `advance_with`."""
        for i, layer in enumerate(self.layers):
            self._through = layer
            yield i, layer
            if i + 1 < len(self.layers):                 # the last layer's outputs feed nothing we quantize
                self.inputs = self.run(self._through)

    def advance_with(self, layer) -> None:
        """Feed the next layer from `layer` (the quantized copy of the current one) instead of the model's own."""
        self._through = layer


def progress(i: int, n: int, label: str, enabled: bool) -> None:
    if enabled:
        end = "\n" if i + 1 == n else ""
        print(f"\r{label}: layer {i + 1}/{n}", end=end, file=sys.stderr, flush=True)
