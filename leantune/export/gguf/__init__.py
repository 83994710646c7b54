"""GGUF for llama.cpp, Ollama and LM Studio: the merged model as one file (k-quants in pure Python), or a
LoRA alone as a GGUF LoRA (`--adapter-only`), with a fidelity report and optionally an Ollama Modelfile.

    writer.py     architecture metadata, tensors in llama.cpp's names and layout (the file itself)
    vocab.py      the tokenizer and its chat template as tokenizer.ggml.* / tokenizer.chat_template
    quant_mix.py  which GGML type each tensor gets for a --quant (llama-quantize's mixes)
    kquants.py    Q2_K / Q3_K / Q4_K / Q5_K / Q6_K encoders, with or without an importance matrix
    kquant_search.py  their per-group scale (and min) searches, llama.cpp's make_qkx2/make_qx quants
    imatrix.py    per-column mean x^2 of every Linear's input over calibration text (--imatrix FILE, or
                  the run's training data by default for Q2_K..Q4_K_M)
    lora.py       the adapter alone, in convert_lora_to_gguf.py's layout
    fidelity.py   GGUF's part of the report (per-tensor error) and the read-back through transformers

The chat template written is the run's (data.chat_template), which the tokenizer from the merge path
carries; the Modelfile carries the run's system prompt as SYSTEM.
"""

from __future__ import annotations

from pathlib import Path

from ...data.tokenize import NAMED_TEMPLATES
from ...errors import ConfigError
from ...io.atomic import write_text
from ..base import Exporter, ExportOptions
from . import fidelity, imatrix
from .lora import write_lora_gguf
from .quant_mix import FILE_TYPES, K_TYPES
from .writer import architecture, write_gguf


class GGUFExporter(Exporter, format="gguf"):
    quants = tuple(FILE_TYPES)
    default_quant = "Q4_K_M"
    suffix = ".gguf"
    writes_adapter = True

    def check_source(self, folder: Path) -> None:
        architecture(folder)   # an unsupported architecture fails here, before anything is loaded

    def default_name(self, stem: str, quant: str | None, adapter_only: bool) -> str:
        return f"{stem}-{'lora-F32' if adapter_only else quant}.gguf"

    def write(self, model, tokenizer, facts, folder: Path, out: Path, quant: str | None,
              options: ExportOptions) -> dict:
        choice = options.extra.get("imatrix")
        if choice and str(choice).lower() != "none" and FILE_TYPES[quant][1] not in K_TYPES:
            raise ConfigError(f"--imatrix weights the k-quants; {quant} has none. Use Q2_K, Q3_K_S/M/L, "
                              f"Q4_K_M, Q5_K_M or Q6_K, or drop --imatrix")
        matrix, where = imatrix.resolve(model, tokenizer, quant, options.extra)
        records = write_gguf(model, tokenizer, folder, out, quant, name=options.name, progress=options.progress,
                             imatrix=matrix)
        if options.modelfile:
            write_text(out.with_name("Modelfile"), ollama_modelfile(out, tokenizer, facts))
        part = fidelity.tensor_report(records)
        part["imatrix"] = where
        print(fidelity.format_table(part))
        return part

    def load_back(self, out: Path):
        return fidelity.load_gguf_back(out)

    def write_adapter(self, model, tokenizer, facts, folder: Path, out: Path, options: ExportOptions) -> dict:
        count, alpha = write_lora_gguf(model, architecture(folder), out, options.name)
        return {"file": str(out), "tensors": count, "alpha": alpha, "file_bytes": out.stat().st_size}


# Ollama renders with Go templates, not Jinja. For a template it knows by name we write its Go form;
# for any other Ollama reads tokenizer.chat_template from the GGUF itself.
_OLLAMA_TEMPLATES = {
    NAMED_TEMPLATES["chatml"]: ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                                '{{ end }}<|im_start|>assistant\n', "<|im_end|>"),
}


def ollama_modelfile(path: Path, tok, facts) -> str:
    """FROM the file; TEMPLATE for a template Ollama needs in Go form; the run's system prompt as SYSTEM;
    stop at the end-of-turn token."""
    lines = [f"FROM ./{path.name}"]
    template, stop = _OLLAMA_TEMPLATES.get(facts.chat_template or "", (None, None))
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if facts.system_prompt:
        lines.append(f'SYSTEM """{facts.system_prompt}"""')
    for token in dict.fromkeys(t for t in (stop, tok.eos_token) if t):
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"
