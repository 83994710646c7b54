"""LoRA adapters and PEFT-format adapter files, on their own (tests/parity/ compares them with PEFT)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.adapters.base import (
    ADAPTERS,
    Adapter,
    adapter_modules,
    count_parameters,
    find_targets,
    format_trainable,
    mark_only_adapters_trainable,
    merge_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from leantune.adapters.lora import LoraLinear, inject_lora, loraplus_param_groups
from leantune.checkpoint.peft_format import load_adapter, save_adapter
from leantune.errors import ConfigError, ModelError

from conftest import build_llama


class TinyNet(nn.Module):
    """A plain torch model (no transformers): adapters must work on any module tree."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)}) for _ in range(2))
        self.lora_proj = nn.Linear(8, 8)  # "lora" in its name, yet a base layer: must stay frozen
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.lm_head(self.norm(self.lora_proj(x)))


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.1)


def ids_for(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------
# The adapter module


def test_lora_registers_itself():
    assert ADAPTERS["lora"] is LoraLinear and LoraLinear.method == "lora"
    with pytest.raises(TypeError, match="already registered"):
        type("OtherLora", (Adapter,), {}, method="lora")


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank_update(rslora):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoraLinear(base, rank=4, alpha=8, rslora=rslora)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), base(x), atol=0, rtol=0)  # B = 0: starts as the base
    nn.init.normal_(lora.lora_B.weight)
    scaling = 8 / math.sqrt(4) if rslora else 8 / 4
    assert lora.scaling == scaling
    expected = base(x) + scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=0)


def test_inject_works_on_a_plain_torch_model_and_all_linear_skips_lm_head():
    model = TinyNet()
    x = torch.randn(4, 8)
    before = model(x)
    paths = inject_lora(model, rank=2, alpha=4)
    assert paths == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "lora_proj"]
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Adapter)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_all_linear_skips_the_output_embedding_of_hf_models(tiny_llama):
    paths = inject_lora(tiny_llama, rank=2, alpha=4)
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_targets_by_name_suffix_and_by_full_regex(tiny_llama):
    assert find_targets(tiny_llama, ["self_attn.q_proj", "down_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(tiny_llama, r"model\.layers\.0\.self_attn\.[qv]_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert find_targets(tiny_llama, ["lm_head"]) == ["lm_head"]  # named explicitly: adapted, as in PEFT


def test_targets_matching_nothing_name_the_linear_layers(tiny_llama):
    with pytest.raises(ModelError, match=r"match no module of LlamaForCausalLM.*down_proj, gate_proj.*q_proj"):
        find_targets(tiny_llama, ["query"])
    with pytest.raises(ModelError, match="match no module"):
        find_targets(tiny_llama, "q_proj")  # a regex must match the whole path
    with pytest.raises(ModelError, match=r"\['v_prj'\] match no module"):
        inject_lora(tiny_llama, rank=2, alpha=4, targets=["q_proj", "v_prj"])  # a typo is not dropped silently
    with pytest.raises(ConfigError, match="not a valid regex"):
        find_targets(tiny_llama, "q_proj(")
    assert not adapter_modules(tiny_llama)


def test_non_linear_target_is_refused_before_anything_changes(tiny_llama):
    with pytest.raises(ModelError, match=r"model.layers.0.mlp is a LlamaMLP, not an nn.Linear.*down_proj, gate_proj"):
        inject_lora(tiny_llama, rank=2, alpha=4, targets=["q_proj", "mlp"])
    assert not adapter_modules(tiny_llama)


def test_bad_hyperparameters_and_double_injection_are_refused(tiny_llama):
    with pytest.raises(ConfigError, match="neither ever gets a gradient"):
        inject_lora(tiny_llama, rank=2, alpha=4, init="zeros")
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        inject_lora(tiny_llama, rank=0, alpha=4)
    inject_lora(tiny_llama, rank=2, alpha=4, targets=["q_proj"])
    with pytest.raises(ModelError, match="already has a lora adapter; unload"):
        inject_lora(tiny_llama, rank=2, alpha=4, targets=["q_proj"])


def test_adapters_are_fp32_over_a_bf16_base_and_outputs_stay_bf16():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    lora = LoraLinear(base, rank=2, alpha=4)
    assert lora.lora_A.weight.dtype == lora.lora_B.weight.dtype == torch.float32
    assert lora(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The trainable set


def test_only_adapter_parameters_train_whatever_their_names():
    model = TinyNet()
    inject_lora(model, rank=2, alpha=4, targets=["up", "down"])
    mark_only_adapters_trainable(model)
    expected = {id(p) for a in adapter_modules(model).values() for p in a.adapter_parameters()}
    assert {id(p) for _, p in trainable_parameters(model)} == expected
    assert not model.lora_proj.weight.requires_grad
    trainable, total = count_parameters(model)
    assert trainable == 4 * (2 * 8 + 16 * 2) and total == sum(p.numel() for p in model.parameters())
    assert format_trainable(model) == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}")
    with pytest.raises(ModelError, match="no adapters to train"):
        mark_only_adapters_trainable(TinyNet())


def test_loraplus_puts_b_at_ratio_times_the_learning_rate():
    model = TinyNet()
    inject_lora(model, rank=2, alpha=4, targets=["up"])
    mark_only_adapters_trainable(model)
    model.norm.weight.requires_grad_(True)  # a 1-d LayerNorm weight goes with B, without decay (as in PEFT)
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, lr_ratio=16, weight_decay=0.1)}
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups.values()] == [
        (1e-3, 0.1, 2), (1e-6, 0.1, 0), (16e-3, 0.1, 2), (16e-3, 0.0, 1)]
    assert groups["lora_B"]["params"][0] is model.blocks[0]["up"].lora_B.weight


# ---------------------------------------------------------------------------------------------
# Merge, unmerge, unload


def test_merge_then_unmerge_restores_fp32_base_weights(tiny_llama):
    inject_lora(tiny_llama, rank=4, alpha=8)
    randomize_b(tiny_llama)
    ids = ids_for(tiny_llama)
    adapter_logits = logits(tiny_llama, ids)
    before = {p: a.base_layer.weight.clone() for p, a in adapter_modules(tiny_llama).items()}
    merge_adapters(tiny_llama)
    merge_adapters(tiny_llama)  # a second merge is a no-op, not a double update
    assert all(a.merged for a in adapter_modules(tiny_llama).values())
    torch.testing.assert_close(logits(tiny_llama, ids), adapter_logits, atol=1e-5, rtol=0)
    unmerge_adapters(tiny_llama)
    for path, a in adapter_modules(tiny_llama).items():
        assert not a.merged
        torch.testing.assert_close(a.base_layer.weight, before[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny_llama, ids), adapter_logits, atol=1e-5, rtol=0)


def test_merge_into_a_bf16_base_is_within_bf16_tolerance(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    model = tiny_llama.to(torch.bfloat16)
    for m in (reference, model):
        torch.manual_seed(0)
        inject_lora(m, rank=4, alpha=8)
        randomize_b(m)
    ids = ids_for(model)
    fp32_logits = logits(reference, ids)
    unmerged = logits(model, ids)
    merge_adapters(model)
    merged = logits(model, ids)
    assert merged.dtype == torch.bfloat16
    scale = fp32_logits.abs().max()
    # A bf16 step is 2^-8 (0.4%) relative; through two layers both land about 1% of the logit scale from
    # fp32 (measured 0.9%), so 2% is bf16 tolerance with room, and far below what a lost update would cost.
    assert (merged.float() - fp32_logits).abs().max() < 0.02 * scale
    assert (merged.float() - unmerged.float()).abs().max() < 0.02 * scale


def test_unload_returns_plain_linear_layers(tiny_llama):
    base_logits = logits(tiny_llama, ids_for(tiny_llama))
    kept = copy.deepcopy(tiny_llama)
    paths = inject_lora(tiny_llama, rank=4, alpha=8)
    randomize_b(tiny_llama)
    adapter_logits = logits(tiny_llama, ids_for(tiny_llama))
    inject_lora(kept, rank=4, alpha=8)
    randomize_b(kept)

    merged = unload(tiny_llama, merge=True)
    assert not adapter_modules(merged)
    assert all(type(merged.get_submodule(p)) is nn.Linear for p in paths)
    torch.testing.assert_close(logits(merged, ids_for(merged)), adapter_logits, atol=1e-5, rtol=0)

    restored = unload(kept, merge=False)
    assert all(type(restored.get_submodule(p)) is nn.Linear for p in paths)
    torch.testing.assert_close(logits(restored, ids_for(restored)), base_logits, atol=0, rtol=0)


def test_merge_into_a_quantized_weight_is_refused():
    lora = LoraLinear(nn.Linear(4, 4), rank=2, alpha=4)
    lora.base_layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ModelError, match="cannot merge LoRA into a quantized base layer"):
        lora.merge()


# ---------------------------------------------------------------------------------------------
# PEFT-format files


def save(model, out, **kw):
    return save_adapter(model, out, base_model_name_or_path="tiny", **kw)


def test_saved_adapter_round_trips_with_identical_logits(tiny_llama, tiny_llama_dir, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    inject_lora(tiny_llama, rank=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"])
    randomize_b(tiny_llama)
    save(tiny_llama, tmp_path, rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"], rslora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, True)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert load_adapter(fresh, tmp_path) == config
    ids = ids_for(fresh)
    torch.testing.assert_close(logits(fresh, ids), logits(tiny_llama, ids), atol=0, rtol=0)


def test_target_modules_fall_back_to_full_paths_when_names_would_adapt_more(tiny_llama, tmp_path):
    inject_lora(tiny_llama, rank=2, alpha=4, targets=r"model\.layers\.0\.self_attn\.q_proj")
    save(tiny_llama, tmp_path)  # no targets given: "q_proj" would also pick layer 1's
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_save_refuses_values_the_adapters_do_not_have(tiny_llama, tmp_path):
    with pytest.raises(ModelError, match="no adapters to save"):
        save(tiny_llama, tmp_path)
    inject_lora(tiny_llama, rank=2, alpha=4, targets=["q_proj"])
    with pytest.raises(ModelError, match="told rank=8 but the adapters have 2"):
        save(tiny_llama, tmp_path, rank=8)
    assert not (tmp_path / "adapter_config.json").exists()


def test_keys_with_an_adapter_name_load(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    inject_lora(tiny_llama, rank=2, alpha=4, targets=["o_proj"])
    randomize_b(tiny_llama)
    save(tiny_llama, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in weights.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    load_adapter(fresh, tmp_path)
    ids = ids_for(fresh)
    torch.testing.assert_close(logits(fresh, ids), logits(tiny_llama, ids), atol=0, rtol=0)


def test_loading_leaves_the_global_rng_alone(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    inject_lora(tiny_llama, rank=2, alpha=4)
    save(tiny_llama, tmp_path)
    state = torch.get_rng_state()
    load_adapter(fresh, tmp_path)
    assert torch.equal(state, torch.get_rng_state())


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture
def saved_adapter(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    inject_lora(model, rank=2, alpha=4)
    return save(model, tmp_path / "adapter")


@pytest.mark.parametrize(("fields", "message"), [
    ({"peft_type": "IA3"}, "leantune loads LoRA adapters; this one is IA3"),
    ({"use_dora": True}, r"uses DoRA \(use_dora\), which leantune does not load"),
    ({"rank_pattern": {"q_proj": 8}}, r"per-module ranks \(rank_pattern\)"),
    ({"alpha_pattern": {"q_proj": 8}}, r"per-module alphas \(alpha_pattern\)"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
    ({"r": 8}, r"different base.*with r=8 this layer needs"),
])
def test_unsupported_or_inconsistent_configs_are_refused(tiny_llama, saved_adapter, fields, message):
    edit_config(saved_adapter, **fields)
    with pytest.raises(ModelError, match=message):
        load_adapter(tiny_llama, saved_adapter)
    assert not adapter_modules(tiny_llama)


def test_adapter_for_a_different_base_is_refused(saved_adapter, tmp_path):
    narrower = build_llama(tmp_path / "narrow", vocab_size=64, hidden=32)
    with pytest.raises(ModelError, match=r"different base \(it was trained on tiny\).*q_proj has A \(2, 64\)"):
        load_adapter(narrower, saved_adapter)
    shallower = build_llama(tmp_path / "shallow", vocab_size=64, layers=1)
    with pytest.raises(ModelError, match="different base.*has no module model.layers.1"):
        load_adapter(shallower, saved_adapter)
    assert not adapter_modules(narrower) and not adapter_modules(shallower)


def test_missing_or_pickled_files_are_named(tiny_llama, saved_adapter, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_adapter(tiny_llama, tmp_path / "nowhere")
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    with pytest.raises(ModelError, match="no adapter_model.safetensors.*pickle, which leantune never loads"):
        load_adapter(tiny_llama, saved_adapter)
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="has no adapter_config.json"):
        load_adapter(tiny_llama, saved_adapter)


def test_loading_twice_is_refused(tiny_llama, saved_adapter):
    load_adapter(tiny_llama, saved_adapter)
    with pytest.raises(ModelError, match="already holds a lora adapter"):
        load_adapter(tiny_llama, saved_adapter)
