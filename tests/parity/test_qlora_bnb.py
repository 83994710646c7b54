"""leantune's quantized bases against transformers + bitsandbytes, and its QLoRA adapters against PEFT, live.

transformers' own bnb loader (`from_pretrained(quantization_config=BitsAndBytesConfig(...))`) is the
reference for every number: the same checkpoint quantized by both gives the same packed bytes and the
same logits; each side reads what the other saved; a QLoRA adapter trained by leantune's loop gives, in
PEFT on a transformers bnb base, the logits it gives in leantune.

Tolerance: with fp32 compute the two sides run the same kernels on the same bytes, so logits are
compared for equality (atol 1e-6 leaves room for summation order only). With bf16 compute they are
compared at bf16 resolution (see test_qlora_adapter_in_peft_bf16_compute).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import PeftModel, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from leantune.config import QuantConfig, from_dict  # noqa: E402
from leantune.models.load import load_model  # noqa: E402
from leantune.models.quantized import save_quantized  # noqa: E402
from leantune.quant import spec_of  # noqa: E402
from leantune.train.loop import run  # noqa: E402

from e2e.test_train_cli import write_chat_data  # noqa: E402

FOUR_BIT = {"nf4": dict(bits=4, type="nf4", double_quant=True), "fp4": dict(bits=4, type="fp4", double_quant=False)}
CASES = {**FOUR_BIT, "int8": dict(bits=8)}


def bnb_config(case: dict, compute=torch.float32) -> BitsAndBytesConfig:
    if case["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=case["type"],
                              bnb_4bit_use_double_quant=case["double_quant"], bnb_4bit_compute_dtype=compute)


def hf_quantized(folder, case=None, compute=torch.float32, dtype=torch.float32):
    kwargs = {"quantization_config": bnb_config(case, compute)} if case else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # on the CPU even where torch sees a GPU: these are the CPU kernels' parity tests (tests/gpu has CUDA's)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": "cpu"},
                                                    **kwargs).eval()


def ours(folder, case=None):
    quant = QuantConfig(**case, compute_dtype="fp32") if case else None
    return load_model(folder, dtype="fp32", device="cpu", quant=quant).eval()


def logits(model, ids=None) -> torch.Tensor:
    ids = ids if ids is not None else torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_quantized_by_leantune_equals_quantized_by_transformers(tiny_llama_dir, case):
    mine, theirs = ours(tiny_llama_dir, case), hf_quantized(tiny_llama_dir, case)
    state, ref = mine.state_dict(), theirs.state_dict()
    assert set(state) == set(ref)
    for key in ref:
        assert torch.equal(state[key].float(), ref[key].float()), key
    torch.testing.assert_close(logits(mine), logits(theirs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", FOUR_BIT.values(), ids=FOUR_BIT.keys())
def test_saved_by_leantune_loads_in_transformers_and_back(tiny_llama_dir, tmp_path, case):
    mine = ours(tiny_llama_dir, case)
    save_quantized(mine, tmp_path / "q")
    theirs = hf_quantized(tmp_path / "q")  # the quantization_config in config.json is all it needs
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(theirs), logits(mine), atol=1e-6, rtol=0)
    again = ours(tmp_path / "q")  # a saved quantized folder loads as stored, no quant section needed
    torch.testing.assert_close(logits(again), logits(mine), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_saved_by_transformers_loads_in_leantune(tiny_llama_dir, tmp_path, case):
    theirs = hf_quantized(tiny_llama_dir, case)
    theirs.save_pretrained(tmp_path / "hf")
    mine = ours(tmp_path / "hf")
    assert spec_of(mine).bits == case["bits"]
    torch.testing.assert_close(logits(mine), logits(theirs), atol=1e-6, rtol=0)


def train_qlora(model_dir, tmp_path, compute: str, dtype: str):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    cfg = from_dict({"model": str(model_dir), "output_dir": str(tmp_path / "run"), "dtype": dtype, "device": "cpu",
                     "data": {"path": str(data), "max_length": 64},
                     "lora": {"rank": 4, "alpha": 8}, "quant": {"bits": 4, "compute_dtype": compute},
                     "train": {"max_steps": 3, "lr": 1e-2, "progress": False, "tensorboard": False,
                               "eval_every": 0, "warmup_steps": 0}})
    result = run(cfg, console=lambda s: None)
    return result.adapter_dir


def test_qlora_adapter_trained_in_leantune_loads_in_peft_with_identical_logits(tiny_llama_dir, tmp_path):
    from leantune.infer.generate import load_for_inference

    adapter = train_qlora(tiny_llama_dir, tmp_path, compute="fp32", dtype="fp32")
    mine, _ = load_for_inference(str(tmp_path / "run"), dtype="fp32", device="cpu")
    assert spec_of(mine).bits == 4
    base = hf_quantized(tiny_llama_dir, FOUR_BIT["nf4"])
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ours_logits, peft_logits = logits(mine), logits(peft_model)
    assert (ours_logits - logits(hf_quantized(tiny_llama_dir, FOUR_BIT["nf4"]))).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(ours_logits, peft_logits, atol=1e-6, rtol=0)
    # the adapter's sidecar carries the quant section: copied out of its run it still loads on the 4-bit base
    copied = shutil.copytree(adapter, tmp_path / "elsewhere" / "my-adapter")
    assert not (copied.parent / "config.yaml").exists()
    moved, _ = load_for_inference(str(copied), dtype="fp32", device="cpu")
    assert spec_of(moved) == spec_of(mine)
    torch.testing.assert_close(logits(moved), ours_logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qlora_adapter_in_peft_bf16_compute(tiny_llama_dir, tmp_path, dtype):
    """bf16 compute, fp32 norm weights on both sides (PEFT's prepare_model_for_kbit_training upcasts them; so
    does leantune's loader): the logits agree to bf16's resolution. With a bf16 `dtype` leantune keeps the
    activations bf16 past the norms (so attention takes SDPA's bf16 kernels) while PEFT's upcast model runs
    them in fp32: a few more bf16 roundings, still at bf16 resolution."""
    from leantune.infer.generate import load_for_inference

    adapter = train_qlora(tiny_llama_dir, tmp_path, compute="bf16", dtype=dtype)
    mine, _ = load_for_inference(str(tmp_path / "run"), dtype=dtype, device="cpu")
    # loaded in the same dtype, so both sides start from the same rounded embeddings and head (PEFT then
    # upcasts them to fp32)
    hf_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    base = prepare_model_for_kbit_training(hf_quantized(tiny_llama_dir, FOUR_BIT["nf4"], torch.bfloat16, hf_dtype),
                                           use_gradient_checkpointing=False)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    a, b = logits(mine).float(), logits(peft_model).float()
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()  # bf16 keeps 8 mantissa bits: 2^-8 = 0.4% per rounding
