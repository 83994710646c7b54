"""Run llm-compressor's GPTQ or AWQ on a model folder with given calibration rows; write the quantized weights.

Runs in the oracle interpreter (LEANTUNE_ORACLE_PYTHON: torch 2.13 CPU, transformers 5.17, llmcompressor),
never imported by leantune or by the test process. Files in and out are safetensors, no pickles:

    python oracle_llmcompressor.py MODEL_DIR ROWS.safetensors OUT.safetensors GROUP_SIZE [MODE]

ROWS holds "input_ids" (samples, seq). MODE: "static" (GPTQ with llm-compressor's default actorder: the
groups' grids from the unsolved weights, the columns solved in descending diag(H) order), "none" (GPTQ, no
actorder) or "awq" (AWQModifier with its defaults, 4-bit asymmetric; it runs on a CPU once the one call that
needs an accelerator, pinning cached activations, is made a no-op here). For AWQ, OUT also holds the norms'
weights, into which the smoothing scales were folded. OUT holds every Linear's
weight after the GPTQ modifier (dequantized, float32) under its module name + ".weight", and, under
"hessian." + name, the normalized Hessian the library solved against (captured from its prepare_batch).
"""

from __future__ import annotations

import sys


def main() -> None:
    model_dir, rows_path, out_path, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    actorder = sys.argv[5] if len(sys.argv) > 5 else "static"
    import torch
    from llmcompressor.modifiers.gptq import base as gptq_base
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.pipelines import cache
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    rows = load_file(rows_path)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
    hessians = {}
    prepare = gptq_base.prepare_batch

    def capture(batch, qparams, by_module, counts):      # records the Hessians, changes nothing
        out = prepare(batch, qparams, by_module, counts)
        for i, module in enumerate(batch):
            hessians[id(module)] = out[1][i].clone()
        return out

    gptq_base.prepare_batch = capture
    # Tensor.pin_memory raises "Cannot access accelerator device when none is available" on a CPU-only
    # machine; pinning only speeds host-to-device copies, so skipping it changes no number
    cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    weights = {"num_bits": 4, "type": "int", "symmetric": actorder != "awq", "strategy": "group", "group_size": group}
    if actorder == "awq":
        recipe = AWQModifier(targets=["Linear"], ignore=["lm_head"],
                             config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    else:
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                              actorder=None if actorder == "none" else actorder, config_groups={
                                  "group_0": {"targets": ["Linear"], "weights": weights | {"observer": "minmax"}}})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=rows.shape[1],
            num_calibration_samples=rows.shape[0])
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.detach().float()
            scale = getattr(m, "weight_scale", None)
            if scale is not None and not _on_grid(w, scale.float(), group):
                # the modifier left the float weight with qparams beside it: fake-quantize it here
                w = _fake(w, scale.float(), getattr(m, "weight_zero_point", None), group)
            out[f"{name}.weight"] = w.contiguous()
            if id(m) in hessians:
                out[f"hessian.{name}"] = hessians[id(m)].contiguous()
        elif name.endswith("norm") and getattr(m, "weight", None) is not None:
            out[f"{name}.weight"] = m.weight.detach().float().contiguous()
    save_file(out, out_path)


def _on_grid(w, scale, group):
    q = w.reshape(w.shape[0], -1, group) / scale[..., None]
    return bool(((q - q.round()).abs() < 1e-3).all())


def _fake(w, scale, zero, group):
    import torch

    zero = torch.zeros_like(scale) if zero is None else zero.float()
    wg = w.reshape(w.shape[0], -1, group)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], -8, 7)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


if __name__ == "__main__":
    main()
