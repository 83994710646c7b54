"""`lora.init: loftq` against PEFT's LoftQ decomposition, live, and what it does to a 4-bit model.

PEFT's replace_lora_weights_loftq moves every tensor to CUDA, so on a CPU the reference is the two
functions it is made of: bitsandbytes' dequantize_4bit of the layer's packed weight, and PEFT's own
`_low_rank_decomposition` of the residual. With lora_alpha == r (scaling 1) leantune's A and B must be
PEFT's R and L.
"""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.utils.loftq_utils import _low_rank_decomposition  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from leantune.adapters.base import adapter_modules  # noqa: E402
from leantune.config import from_dict  # noqa: E402
from leantune.errors import ConfigError  # noqa: E402
from leantune.train.loop import run  # noqa: E402

from e2e.test_train_cli import write_chat_data  # noqa: E402
from parity.test_qlora_bnb import FOUR_BIT, hf_quantized, logits  # noqa: E402


def cfg(model_dir, tmp_path, steps=1, rank=8, alpha=8, **over):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    return from_dict({"model": str(model_dir), "output_dir": str(tmp_path / "run"), "dtype": "fp32", "device": "cpu",
                      "data": {"path": str(data), "max_length": 64},
                      "lora": {"rank": rank, "alpha": alpha, "init": "loftq"},
                      "quant": {"bits": 4, "compute_dtype": "fp32"},
                      "train": {"max_steps": steps, "lr": 1e-2, "progress": False, "tensorboard": False,
                                "eval_every": 0, "warmup_steps": 0}, **over})


def attached(c):
    """The model exactly as the loop builds it, before any step: load, quantize, inject, LoftQ."""
    from leantune.models.load import load_model
    from leantune.train.loop import _attach_adapter

    model = load_model(c.model, dtype=torch.float32, device=torch.device("cpu"), quant=c.quant)
    _attach_adapter(model, c, console=lambda s: None)
    return model


def test_loftq_factors_are_peft_decomposition_of_the_quantization_residual(tiny_llama_dir, tmp_path):
    import bitsandbytes.functional as F

    model = attached(cfg(tiny_llama_dir, tmp_path))
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    adapters = adapter_modules(model)
    assert len(adapters) == 14  # 7 Linear layers in each of 2 decoder layers
    for path, a in adapters.items():
        residual = weights[f"{path}.weight"].float() - F.dequantize_4bit(a.base_layer.weight.data,
                                                                         a.base_layer.weight.quant_state)
        ref = _low_rank_decomposition(residual, reduced_rank=a.rank)
        torch.testing.assert_close(a.lora_A.weight, ref["R"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.weight, ref["L"], rtol=1e-5, atol=1e-6)


def test_loftq_divides_by_the_scaling_so_the_update_is_the_residual(tiny_llama_dir, tmp_path):
    import bitsandbytes.functional as F

    model = attached(cfg(tiny_llama_dir, tmp_path, rank=8, alpha=32))  # scaling 4
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    for path, a in adapter_modules(model).items():
        residual = weights[f"{path}.weight"].float() - F.dequantize_4bit(a.base_layer.weight.data,
                                                                         a.base_layer.weight.quant_state)
        ref = _low_rank_decomposition(residual, reduced_rank=a.rank)
        torch.testing.assert_close(a.scaling * a.lora_B.weight @ a.lora_A.weight, ref["L"] @ ref["R"],
                                   rtol=1e-4, atol=1e-5)


def test_loftq_starts_nearer_the_float_model_than_the_4bit_base(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval())
    plain = logits(hf_quantized(tiny_llama_dir, FOUR_BIT["nf4"]))
    ours = logits(attached(cfg(tiny_llama_dir, tmp_path)).eval())
    err_plain, err_loftq = (plain - ref).norm(), (ours - ref).norm()
    assert err_loftq < 0.9 * err_plain, (float(err_plain), float(err_loftq))


def test_loftq_adapter_trains_and_loads_in_peft_as_plain_lora(tiny_llama_dir, tmp_path):
    from leantune.infer.generate import load_for_inference

    lines = []
    res = run(cfg(tiny_llama_dir, tmp_path, steps=3), console=lines.append)
    assert any(s.startswith("lora.init loftq: 14 layers") for s in lines), lines
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # a plain LoRA: PEFT must not re-run an init when loading it
    mine, _ = load_for_inference(str(tmp_path / "run"), dtype="fp32", device="cpu")
    theirs = PeftModel.from_pretrained(hf_quantized(tiny_llama_dir, FOUR_BIT["nf4"]), res.adapter_dir).eval()
    torch.testing.assert_close(logits(mine), logits(theirs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("over", [{"quant": {"bits": None}}, {"quant": {"bits": 8}}], ids=["no-quant", "8-bit"])
def test_loftq_without_a_4bit_base_is_refused_naming_the_fix(tiny_llama_dir, tmp_path, over):
    with pytest.raises(ConfigError, match="quant.bits 4"):
        cfg(tiny_llama_dir, tmp_path, **over)
