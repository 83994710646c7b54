"""A LoRA adapter alone as a GGUF LoRA for llama.cpp's --lora, in convert_lora_to_gguf.py's layout.

general.type "adapter", adapter.type "lora", adapter.lora.alpha; per adapted Linear two F32 tensors
named after the base weight: blk.N.attn_q.weight.lora_a (r, in) and .lora_b (out, r).
llama.cpp scales every pair by alpha / r (r read from the tensor shape). Our scale is alpha / r, or
alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732), so the file stores
alpha' = scale * r (rsLoRA: alpha * sqrt(r)); one alpha per file, so every module must share scale*r.
For the llama arch, W's rows are RoPE-permuted on export (gguf.rope_permute); W + B A keeps that
form when only B's rows are permuted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...adapters.base import adapter_modules
from ...errors import ModelError
from ...io.atomic import atomic_path
from .writer import _text_config, gguf_name, rope_permute


def lora_pairs(model, arch: str) -> tuple[list[tuple[str, np.ndarray]], float]:
    """[(gguf tensor name, array)] for every LoRA module of `model`, and the alpha llama.cpp needs."""
    c = _text_config(model.config)
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    tensors, alphas = [], set()
    for path, module in adapter_modules(model).items():
        if not (hasattr(module, "lora_A") and hasattr(module, "scaling")) or type(module).__name__ != "LoraLinear":
            raise ModelError(f"{path} holds a {type(module).__name__}; --adapter-only exports plain LoRA only "
                             f"(export the merged model instead: drop --adapter-only)")
        name = gguf_name(f"{path}.weight")
        if name is None:
            raise ModelError(f"adapted module {path} has no llama.cpp tensor name; drop it from lora.targets")
        a = module.lora_A.weight.detach().float()  # (r, in)
        b = module.lora_B.weight.detach().float()  # (out, r)
        if arch == "llama" and ".attn_q." in name:
            b = rope_permute(b, n_head)
        elif arch == "llama" and ".attn_k." in name:
            b = rope_permute(b, n_kv)
        tensors += [(f"{name}.lora_a", a.contiguous().numpy()), (f"{name}.lora_b", b.contiguous().numpy())]
        alphas.add(round(float(module.scaling) * a.shape[0], 6))
    if not tensors:
        raise ModelError("the source has no LoRA adapter; --adapter-only needs a run or an adapter folder")
    if len(alphas) > 1:
        raise ModelError(f"modules differ in scale*rank {sorted(alphas)}; a GGUF LoRA holds one alpha. "
                         f"Export the merged model instead (drop --adapter-only)")
    return tensors, alphas.pop()


def write_lora_gguf(model, arch: str, out: Path, name: str) -> tuple[int, float]:
    """Write the adapter of `model` (attached, not merged) to `out`; return (tensor count, alpha)."""
    import gguf

    tensors, alpha = lora_pairs(model, arch)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tname, data in tensors:
            writer.add_tensor(tname, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return len(tensors), alpha
