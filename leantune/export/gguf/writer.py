"""Write a Llama-family model (optionally with its LoRA merged in) as one GGUF file for llama.cpp,
Ollama and LM Studio: architecture metadata, tokenizer, chat template and tensors in llama.cpp's names.

Names follow llama.cpp's tensor map (gguf.constants TENSOR_NAMES): token_embd, blk.N.attn_q/k/v/output,
blk.N.attn_norm, blk.N.ffn_gate/up/down, blk.N.ffn_norm, output_norm, output. For the llama arch,
convert_hf_to_gguf.py reorders the rows of q_proj and k_proj from HF's rotate-half RoPE layout to the
interleaved pairs llama.cpp's RoPE expects: per head, rows (h, 2, d/2) -> (h, d/2, 2). transformers'
GGUF loader undoes exactly this. Qwen2 and Qwen3 use llama.cpp's NEOX RoPE, so their rows stay as they
are; Qwen3's per-head RMSNorms of q and k (q_norm, k_norm) are blk.N.attn_q_norm / attn_k_norm.
Phi-3 (NEOX RoPE too) keeps its fused qkv_proj and gate_up_proj as attn_qkv and ffn_up, and, as
convert_hf_to_gguf.py's Phi3MiniModel, writes rope.scaling.original_context_length (and sliding_window
when set); its longrope / su scaling (128k models) is not exported yet.
Gemma 2 / Gemma 3 (text), as the converter's Gemma2Model / Gemma3Model: every RMSNorm weight is stored
plus 1 (HF's Gemma norms scale by 1 + w, llama.cpp's by w); the four norms of a layer are attn_norm,
post_attention_norm, ffn_norm (pre-feedforward) and post_ffw_norm; Gemma 3 adds attn_q_norm / attn_k_norm.
Keys: attention/final logit softcapping (Gemma 2 both, Gemma 3 the final one when set), the sliding
window, key/value length = head_dim, Gemma 3's rope base of its full-attention layers (and linear
scaling of those). llama.cpp derives the rest itself: the embedding scale sqrt(hidden), the
sliding-layer pattern (Gemma 2 every other layer, Gemma 3 five of six), Gemma 3's local rope base 10000
and the attention scale 1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 27B): a config that differs
from those (query_pre_attn_scalar, layer_types) is refused, since llama.cpp would run another model.
The file is written to a temporary sibling and renamed into place (io/atomic.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import ModelError
from ...io.atomic import atomic_path
from . import quant_mix
from .vocab import add_tokenizer

# HF architecture -> llama.cpp architecture. Mistral v0.1-v0.3 is a Llama to llama.cpp.
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3",
         "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
GEMMA = ("gemma2", "gemma3")
# Gemma's four norms per layer (llama.cpp's names); Llama's post_attention_layernorm is its ffn_norm
_GEMMA_PARTS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}

_LAYER_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    # Phi-3's fused projections: llama.cpp keeps them fused, gate_up as ffn_up (gate rows first, as HF)
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class TensorRecord:
    name: str
    qtype: str
    shape: tuple[int, ...]
    nbytes: int
    rmse: float
    max_rel: float  # max |error| / max |source|


def architecture(folder: Path) -> str:
    """The llama.cpp arch of an HF folder, or a ModelError naming what is supported (before any loading)."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} has no config.json; export takes an HF model folder, a .gguf or a run folder")
    archs = json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or []
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    raise ModelError(f"GGUF export supports {', '.join(sorted(ARCHS))}; {folder} is {archs or 'unknown'}. "
                     f"Use llama.cpp's convert_hf_to_gguf.py for other architectures")


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _LAYER_KEY.match(hf_name)
    parts = {**_LAYER_PARTS, **_GEMMA_PARTS} if arch in GEMMA else _LAYER_PARTS
    if m and m.group(2) in parts:
        return f"blk.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"
    return None


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head. (out, ...) -> (out, ...)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _text_config(cfg):
    return getattr(cfg, "text_config", None) or cfg


def _rope_params(cfg) -> dict:
    """The RoPE parameters of a config; Gemma 3's per layer type: those of its full-attention layers."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("full_attention", params) if isinstance(params, dict) else {}


def _rope_theta(cfg) -> float:
    params = _rope_params(cfg)
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def _rope_kind(cfg, arch: str = "llama") -> tuple[str, dict]:
    """The RoPE scaling of a config, or a ModelError for one llama.cpp cannot be given by this writer.

    default: nothing to write. linear (position interpolation): {arch}.rope.scaling.type "linear" and
    .factor, as convert_hf_to_gguf.py writes them. llama3 (Llama 3.1+): the converter's rope_freqs.weight
    tensor, one divisor per frequency that llama.cpp applies to base^(-2i/d) (`rope_freqs`)."""
    params = _rope_params(cfg)
    kind = (params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default") or "default"
    if kind == "default" or kind == "linear" or (kind == "llama3" and arch == "llama"):
        return kind, params
    raise ModelError(f"RoPE scaling {kind!r} is not exported yet for {arch} (supported: linear, and llama3 for Llama); "
                     f"export a model without it or use llama.cpp's convert_hf_to_gguf.py")


def _check_rope(cfg, arch: str = "llama") -> None:
    _rope_kind(cfg, arch)
    if arch in GEMMA:
        _check_gemma(cfg, arch)


def _check_gemma(cfg, arch: str) -> None:
    """What llama.cpp hard-codes for Gemma must be what the config says (see the module docstring)."""
    n = int(cfg.num_hidden_layers)
    big = n == (46 if arch == "gemma2" else 62)  # llama.cpp's 27B, told apart by its layer count
    scale = cfg.hidden_size // cfg.num_attention_heads if big else cfg.head_dim
    problems = []
    if int(getattr(cfg, "query_pre_attn_scalar", scale) or scale) != scale:
        problems.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp uses {scale})")
    every = 2 if arch == "gemma2" else 6
    want = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    types = list(getattr(cfg, "layer_types", None) or want)
    if getattr(cfg, "sliding_window", None) and types != want:
        problems.append(f"layer_types {types} (llama.cpp: every {every}th layer full attention)")
    sliding = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if arch == "gemma3" and float(sliding.get("rope_theta", 10000.0)) != 10000.0:
        problems.append(f"local rope_theta {sliding['rope_theta']} (llama.cpp uses 10000)")
    if not getattr(cfg, "tie_word_embeddings", True) and arch == "gemma2":
        problems.append("an untied lm_head (llama.cpp's gemma2 has none)")
    if problems:
        raise ModelError(f"this {arch} config has {'; '.join(problems)}; llama.cpp would compute another model. "
                         "Export a config with llama.cpp's values or use convert_hf_to_gguf.py")


def rope_freqs(model) -> np.ndarray:
    """llama3 RoPE scaling as llama.cpp's rope_freqs: the unscaled inverse frequencies divided by the ones
    the torch model rotates with (its rotary_emb buffer), so the GGUF rotates exactly as the model does.
    (head_dim / 2,)"""
    c = _text_config(model.config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plain = 1.0 / (_rope_theta(c) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaled = model.model.rotary_emb.inv_freq.detach().float().cpu()
    return (plain / scaled).numpy().astype(np.float32)


def add_architecture(writer, cfg, arch: str, name: str) -> None:
    c = _text_config(cfg)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_head_count(int(c.num_attention_heads))
    writer.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))
    # convert_hf_to_gguf.py writes these whenever config.json has head_dim; llama.cpp needs them when
    # head_dim != hidden / heads (Qwen3: 128 with hidden 1024 and 16 heads)
    if getattr(c, "head_dim", None) or head_dim * c.num_attention_heads != c.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(getattr(c, "original_max_position_embeddings", None)
                                                 or c.max_position_embeddings))
        if getattr(c, "sliding_window", None):
            writer.add_sliding_window(int(c.sliding_window))
    if arch in GEMMA:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
        if arch == "gemma2" and getattr(c, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
        if getattr(c, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
        if getattr(c, "sliding_window", None):
            writer.add_sliding_window(int(c.sliding_window))
    kind, params = _rope_kind(c, arch)
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def gguf_tensors(model, arch: str):
    """(gguf name, float32 numpy array) in llama.cpp's order and layout; q/k rows permuted for llama."""
    c = _text_config(model.config)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if _rope_kind(c, arch)[0] == "llama3":
        yield "rope_freqs.weight", rope_freqs(model)
    for hf_name, t in model.state_dict().items():
        name = gguf_name(hf_name, arch)
        if name is None:
            if "rotary_emb" in hf_name:
                continue
            raise ModelError(f"tensor {hf_name!r} has no llama.cpp name; this model variant is not exportable yet")
        if name == "output.weight" and tied:
            continue
        t = t.detach().to(torch.float32)
        if arch in GEMMA and name.endswith("norm.weight"):
            t = t + 1  # Gemma's RMSNorm scales by 1 + w
        if arch == "llama" and ".attn_q." in name:
            t = rope_permute(t, n_head)
        elif arch == "llama" and ".attn_k." in name:
            t = rope_permute(t, n_kv)
        yield name, t.contiguous().numpy()


def write_gguf(model, tok, folder: Path, out: Path, quant: str, *, name: str = "", progress: bool = True,
               imatrix: dict[str, np.ndarray] | None = None) -> list[TensorRecord]:
    """Write `model` (a loaded HF Llama-family model, adapters already merged) to `out` as `quant`.

    imatrix: {gguf tensor name: per-column importance} (imatrix.py) for the k-quant tensors.
    Returns one record per tensor: its GGML type, stored bytes and dequantization error vs the source.
    """
    import gguf

    quant = quant_mix.check_quant(quant)
    arch = architecture(folder)
    cfg = _text_config(model.config)
    _check_rope(cfg, arch)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_layers = int(cfg.num_hidden_layers)
    gqa = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    records: list[TensorRecord] = []
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        add_architecture(writer, model.config, arch, name or folder.name)
        writer.add_file_type(int(quant_mix.FILE_TYPES[quant][0]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, folder, tok, arch, int(cfg.vocab_size))
        items = list(gguf_tensors(model, arch))
        for tname, data in _progress(items, progress, f"quantizing to {quant}"):
            qtype = quant_mix.tensor_type(tname, data.shape, quant, n_layers, tied, gqa)
            stored = quant_mix.encode(data, qtype, (imatrix or {}).get(tname))
            records.append(_record(tname, data, stored, qtype))
            writer.add_tensor(tname, stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return records


def _record(name: str, data: np.ndarray, stored: np.ndarray, qtype) -> TensorRecord:
    err = quant_mix.decode(stored, qtype).reshape(data.shape) - data
    peak = float(np.abs(data).max()) or 1.0
    return TensorRecord(name=name, qtype=qtype.name, shape=tuple(int(s) for s in data.shape), nbytes=int(stored.nbytes),
                        rmse=float(np.sqrt(np.mean(np.square(err, dtype=np.float64)))),
                        max_rel=float(np.abs(err).max()) / peak)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", mininterval=0.5)

