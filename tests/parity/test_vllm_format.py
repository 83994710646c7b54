"""leantune's saved adapters against vLLM's LoRA loader, whose checks are restated here as rules.

vLLM cannot run here (it needs a GPU and a wheel of over 300 MB), so this file restates in our own code each
check its loader makes on a PEFT adapter folder, and applies them to adapters leantune saves from a tiny
Llama. The rules were read from vLLM 0.33.0 (the PyPI wheel, built from commit 4ba787ec9):

  vllm/lora/worker_manager.py   WorkerLoRAManager._load_adapter: expected modules, then the steps below
  vllm/lora/peft_helper.py      PEFTHelper: from_dict, __post_init__, _validate_features, validate_legal
  vllm/lora/lora_model.py       LoRAModel.from_local_checkpoint: which file, which modules are unexpected
  vllm/lora/utils.py            parse_fine_tuned_lora_name, get_supported_lora_modules
  vllm/lora/model_manager.py    packing q/k/v and gate/up LoRAs into vLLM's fused layers
  vllm/lora/layers/base_linear.py   set_lora: A and B copied into (max_rank, in) / (out, max_rank) buffers
  vllm/model_executor/models/llama.py   LlamaForCausalLM: packed_modules_mapping, embedding_modules
  vllm/config/lora.py           MaxLoRARanks: the values --max-lora-rank accepts

Each rule returns the problems vLLM would raise (an empty list means vLLM accepts), so a negative test
can break a saved adapter and show which rule reports it. Two rules are stricter than vLLM, on purpose:
a LoRA that no vLLM layer uses, and a factor of the wrong size, load without an error there and only
change the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leantune.adapters.base import adapter_modules
from leantune.adapters.lora import inject_lora
from leantune.checkpoint.peft_format import save_adapter

# llama.py: the LoRA-capable (LinearBase) layers of vLLM's Llama decoder layer, by block.
LLAMA_LAYERS = {"self_attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}
# llama.py LlamaForCausalLM.packed_modules_mapping: fused vLLM layer -> the HF modules trained into it.
LLAMA_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# llama.py LlamaForCausalLM.embedding_modules: get_supported_lora_modules adds these names too.
LLAMA_EMBEDDINGS = ("embed_tokens", "lm_head")
# config/lora.py MaxLoRARanks.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# peft_helper.py _init_is_supported: string inits that leave the base weights as they were.
SERVED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


# ---------------------------------------------------------------------------------------------
# The rules, in the order vLLM applies them


def expected_lora_modules() -> set[str]:
    """worker_manager.py _load_adapter: the supported leaf names, each fused one replaced by the
    names its parts are trained under (qkv_proj -> q_proj, k_proj, v_proj)."""
    supported = [leaf for leaves in LLAMA_LAYERS.values() for leaf in leaves] + list(LLAMA_EMBEDDINGS)
    return {name for leaf in supported for name in LLAMA_PACKED.get(leaf, (leaf,))}


def from_dict_problems(config: dict) -> list[str]:
    """peft_helper.py PEFTHelper.from_dict: r, lora_alpha and target_modules are required (the other fields
    default; unknown ones are dropped). vLLM does not check the types, but computes alpha / r at once and
    keeps target_modules as list[str] | str, so we hold the fields to those types."""
    missing = sorted({"r", "lora_alpha", "target_modules"} - config.keys())
    if missing:
        return [f"missing required field(s) {missing}"]
    problems = []
    if not isinstance(config["r"], int) or isinstance(config["r"], bool):
        problems.append(f"r must be an int, got {config['r']!r}")
    if not isinstance(config["lora_alpha"], (int, float)) or isinstance(config["lora_alpha"], bool):
        problems.append(f"lora_alpha must be a number, got {config['lora_alpha']!r}")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules must be a string or a list of strings, got {targets!r}")
    return problems


def post_init_problems(config: dict) -> list[str]:
    """peft_helper.py PEFTHelper.__post_init__: r > 0, and every rank in rank_pattern a positive int."""
    problems = [] if config["r"] > 0 else [f"LoRA rank `r` must be a positive integer, got {config['r']}"]
    for key, rank in (config.get("rank_pattern") or {}).items():
        if not isinstance(rank, int) or rank <= 0:
            problems.append(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
    return problems


def vllm_scaling(config: dict) -> float:
    """peft_helper.py PEFTHelper._scaling: alpha / sqrt(r) with use_rslora, else alpha / r."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def feature_problems(config: dict) -> list[str]:
    """peft_helper.py PEFTHelper._validate_features: PEFT features vLLM does not implement."""
    problems = []
    saved = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(f"modules_to_save {saved}: only None or classification heads are served")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
    if config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias) is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SERVED_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights, which vLLM does not serve")
    for field, what in [("alora_invocation_tokens", "aLoRA"), ("layer_replication", "layer_replication"),
                        ("use_bdlora", "BD-LoRA"), ("use_qalora", "QA-LoRA")]:
        if config.get(field):
            problems.append(f"{what} ({field}) is not supported")
    return problems


def legal_problems(config: dict, max_lora_rank: int) -> list[str]:
    """peft_helper.py PEFTHelper.validate_legal: the features above, every rank (r and rank_pattern's) at
    most --max-lora-rank, and bias "none". --max-lora-rank itself must be one of MaxLoRARanks."""
    problems = feature_problems(config)
    if max_lora_rank not in MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of {MAX_LORA_RANKS}")
    top = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if top > max_lora_rank:
        problems.append(f"LoRA rank {top} is greater than max_lora_rank {max_lora_rank}")
    if config.get("bias", "none") != "none":
        problems.append(f"adapter bias ({config['bias']!r}) is not supported")
    return problems


def weights_file(adapter_dir: Path) -> Path:
    """lora_model.py from_local_checkpoint: adapter_model.safetensors, else .bin, else .pt."""
    for name in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise ValueError(f"{adapter_dir} doesn't contain tensors")


def parse_lora_key(key: str) -> tuple[str, bool]:
    """utils.py parse_fine_tuned_lora_name, for a model with no renames (Llama's hf_to_vllm_mapper only
    stacks, and get_rename_mapper drops stacking): strip a leading "base_model.model.", then
    "<module>.lora_A.weight" / "<module>.lora_B.weight" -> (module, is_lora_a). The embedding and
    classification-head forms are left out: leantune writes neither."""
    name = key.removeprefix("base_model.model.")
    head, _, factor = name.removesuffix(".weight").rpartition(".")
    if key.endswith(".weight") and factor in ("lora_A", "lora_B") and head:
        return head, factor == "lora_A"
    raise ValueError(f"{key} is unsupported LoRA weight")


def unexpected_modules(modules: set[str], config: dict) -> list[str]:
    """lora_model.py from_local_checkpoint's check_unexpected_modules: a module whose last name is not
    an expected LoRA module (nor in modules_to_save) fails the whole adapter."""
    allowed = expected_lora_modules() | set(config.get("modules_to_save") or ())
    return sorted(m for m in modules if m.rsplit(".", 1)[-1] not in allowed)


def vllm_layer(module: str, num_layers: int) -> str | None:
    """model_manager.py _register_packed_modules / _create_merged_loras_inplace: the vLLM layer that takes
    this module's LoRA (q_proj's goes into qkv_proj). None: no layer looks it up, and vLLM drops it
    without a word, so we count it as a problem."""
    parent, _, leaf = module.rpartition(".")
    fused = next((f for f, parts in LLAMA_PACKED.items() if leaf in parts), leaf)
    layers = {f"model.layers.{i}.{block}.{name}"  # llama.py: model.layers.N.self_attn / .mlp
              for i in range(num_layers) for block, names in LLAMA_LAYERS.items() for name in names}
    return f"{parent}.{fused}" if f"{parent}.{fused}" in layers else None


def llama_slice_sizes(hf_config) -> dict[str, tuple[int, int]]:
    """(in, out) of each part of vLLM's Llama layers, sized as llama.py builds QKVParallelLinear and
    MergedColumnParallelLinear. base_linear.py set_lora copies A into [:r, :in] and B into [:out, :r] of
    buffers of these sizes: a factor too big fails there, one too small loads and computes garbage."""
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def weight_problems(tensors: dict[str, torch.Tensor], config: dict, hf_config) -> list[str]:
    """Every key parses, every module is expected, has one A and one B of Llama's sizes, and feeds a layer."""
    pairs: dict[str, dict[bool, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        try:
            module, is_a = parse_lora_key(key)
        except ValueError as e:
            problems.append(str(e))
            continue
        pairs.setdefault(module, {})[is_a] = tensor
    unexpected = unexpected_modules(set(pairs), config)
    if unexpected:
        problems.append(f"expected target modules in {sorted(expected_lora_modules())} but received {unexpected}")
    sizes, r = llama_slice_sizes(hf_config), config["r"]
    for module, factors in sorted(pairs.items()):
        leaf = module.rsplit(".", 1)[-1]
        if module in unexpected or leaf not in sizes:
            continue
        if set(factors) != {True, False}:
            problems.append(f"{module} has lora_{'A' if True in factors else 'B'} but not its partner")
            continue
        if vllm_layer(module, hf_config.num_hidden_layers) is None:
            problems.append(f"{module}: no vLLM Llama layer takes this LoRA, so vLLM would drop it")
        fan_in, fan_out = sizes[leaf]
        a, b = tuple(factors[True].shape), tuple(factors[False].shape)
        if a != (r, fan_in) or b != (fan_out, r):
            problems.append(f"{module}: A {a} and B {b}, but vLLM's layer takes A {(r, fan_in)} and B {(fan_out, r)}")
    return problems


def vllm_problems(adapter_dir: Path, max_lora_rank: int, hf_config) -> list[str]:
    """Everything above, as _load_adapter runs it: config, then validate_legal, then the weights."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = from_dict_problems(config)
    if problems:
        return problems
    problems = post_init_problems(config) + legal_problems(config, max_lora_rank)
    try:
        path = weights_file(adapter_dir)
    except ValueError as e:
        return problems + [str(e)]
    return problems + weight_problems(load_file(str(path)), config, hf_config)


def serve_rank(r: int) -> int:
    """The smallest --max-lora-rank that serves rank r."""
    return min(m for m in MAX_LORA_RANKS if m >= r)


# ---------------------------------------------------------------------------------------------
# leantune's adapters under those rules

CASES = {
    "plain": dict(rank=8, alpha=16, targets="all-linear"),
    "rslora": dict(rank=16, alpha=8, targets="all-linear", rslora=True),
    "target-list": dict(rank=4, alpha=8, targets=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                        dropout=0.05),
    "all-linear-gaussian": dict(rank=8, alpha=8, targets="all-linear", init="gaussian"),
    "regex": dict(rank=8, alpha=16, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj"),
}


def save(model, out_dir: Path, rank, alpha, targets, dropout=0.0, rslora=False, init="default") -> Path:
    torch.manual_seed(0)
    inject_lora(model, rank, alpha, dropout=dropout, targets=targets, rslora=rslora, init=init)
    return save_adapter(model, out_dir, base_model_name_or_path="tiny-llama", rank=rank, alpha=alpha,
                        dropout=dropout, targets=targets, rslora=rslora)


@pytest.mark.parametrize("case", CASES)
def test_vllm_accepts_saved_adapter(tiny_llama, tmp_path, case):
    d = save(tiny_llama, tmp_path / case, **CASES[case])
    config = json.loads((d / "adapter_config.json").read_text())
    assert from_dict_problems(config) == []
    assert post_init_problems(config) == []
    assert legal_problems(config, serve_rank(config["r"])) == []
    assert weights_file(d).name == "adapter_model.safetensors"  # not the pickle formats vLLM also reads
    assert vllm_problems(d, serve_rank(config["r"]), tiny_llama.config) == []

    # Each key parses to (module, is_lora_a); the modules are exactly the ones leantune adapted.
    tensors = load_file(str(weights_file(d)))
    adapters = adapter_modules(tiny_llama)
    parsed = [parse_lora_key(k) for k in tensors]
    assert sorted(parsed) == sorted((path, is_a) for path in adapters for is_a in (True, False))
    assert unexpected_modules({m for m, _ in parsed}, config) == []

    # Every module is a Linear of the base, feeds one of vLLM's Llama layers, with the sizes vLLM uses.
    sizes = llama_slice_sizes(tiny_llama.config)
    for key, tensor in tensors.items():
        module, is_a = parse_lora_key(key)
        base = adapters[module].base_layer
        assert type(base) is nn.Linear
        assert vllm_layer(module, tiny_llama.config.num_hidden_layers) is not None, module
        fan_in, fan_out = sizes[module.rsplit(".", 1)[-1]]
        assert (fan_in, fan_out) == (base.in_features, base.out_features)
        assert tuple(tensor.shape) == ((config["r"], fan_in) if is_a else (fan_out, config["r"]))

    # vLLM folds its scaling into B (lora_weights.py optimize): it must be the one leantune trained with.
    assert {a.scaling for a in adapters.values()} == {vllm_scaling(config)}


def test_rank_needs_a_max_lora_rank_at_least_as_large(tiny_llama, tmp_path):
    d = save(tiny_llama, tmp_path / "a", rank=12, alpha=24, targets=["q_proj", "v_proj"])
    config = json.loads((d / "adapter_config.json").read_text())
    assert serve_rank(12) == 16
    assert legal_problems(config, 16) == []
    assert any("greater than max_lora_rank 8" in p for p in legal_problems(config, 8))
    assert any("is not one of" in p for p in legal_problems(config, 12))  # rank 12 itself is no valid flag


# ---------------------------------------------------------------------------------------------
# Each rule can fail: one broken adapter per rule


def edit_config(**fields):
    def edit(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        for name, value in fields.items():
            if value is KeyError:
                config.pop(name)
            else:
                config[name] = value
        (d / "adapter_config.json").write_text(json.dumps(config))
    return edit


def edit_weights(change):
    def edit(d: Path) -> None:
        path = d / "adapter_model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
    return edit


Q = "base_model.model.model.layers.0.self_attn.q_proj"
NORM = "base_model.model.model.norm"


def rename(old: str, new: str):
    return lambda t: t.__setitem__(new, t.pop(old))


def transpose(key: str):
    return lambda t: t.__setitem__(key, t[key].T.contiguous())


def drop_inner_model_prefix(t: dict) -> None:  # keys as if saved from LlamaModel instead of LlamaForCausalLM
    for key in list(t):
        rename(key, key.replace("base_model.model.model.", "base_model.model.", 1))(t)


BREAKS = {  # the mutation, and words from the problem it must raise
    "missing r": (edit_config(r=KeyError), "missing required field"),
    "missing target_modules": (edit_config(target_modules=KeyError), "missing required field"),
    "alpha as a string": (edit_config(lora_alpha="16"), "lora_alpha must be a number"),
    "rank zero": (edit_config(r=0), "positive integer"),
    "bad rank_pattern": (edit_config(rank_pattern={"q_proj": 0}), "rank_pattern"),
    "rank_pattern over max": (edit_config(rank_pattern={"q_proj": 64}), "greater than max_lora_rank"),
    "DoRA": (edit_config(use_dora=True), "DoRA"),
    "modules_to_save": (edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "lora_bias": (edit_config(lora_bias=True), "lora_bias"),
    "PiSSA init": (edit_config(init_lora_weights="pissa_niter_4"), "changes the base weights"),
    "aLoRA": (edit_config(alora_invocation_tokens=[5, 6]), "aLoRA"),
    "layer_replication": (edit_config(layer_replication=[[0, 2]]), "layer_replication"),
    "BD-LoRA": (edit_config(use_bdlora={"nblocks": 2}), "BD-LoRA"),
    "QA-LoRA": (edit_config(use_qalora=True), "QA-LoRA"),
    "bias": (edit_config(bias="all"), "adapter bias"),
    "no weights file": (lambda d: (d / "adapter_model.safetensors").unlink(), "doesn't contain tensors"),
    "unknown factor name": (edit_weights(rename(f"{Q}.lora_A.weight", f"{Q}.lora_down.weight")),
                            "unsupported LoRA weight"),
    "DoRA magnitude": (edit_weights(lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(64)})),
                       "unsupported LoRA weight"),
    "module vLLM lacks": (edit_weights(lambda t: t.update({f"{NORM}.lora_A.weight": torch.zeros(8, 64),
                                                           f"{NORM}.lora_B.weight": torch.zeros(64, 8)})),
                          "but received"),
    "path vLLM lacks": (edit_weights(drop_inner_model_prefix), "vLLM would drop it"),
    "A without B": (edit_weights(lambda t: t.pop(f"{Q}.lora_B.weight")), "not its partner"),
    "A transposed": (edit_weights(transpose(f"{Q}.lora_A.weight")), "but vLLM's layer takes"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_each_rule_rejects_its_break(tiny_llama, tmp_path, name):
    d = save(tiny_llama, tmp_path / "a", rank=8, alpha=16, targets="all-linear")
    assert vllm_problems(d, 8, tiny_llama.config) == []
    mutate, words = BREAKS[name]
    mutate(d)
    problems = vllm_problems(d, 8, tiny_llama.config)
    assert any(words in p for p in problems), problems


def test_scaling_check_catches_a_lost_rslora_flag(tiny_llama, tmp_path):
    d = save(tiny_llama, tmp_path / "a", rank=16, alpha=8, targets=["q_proj"], rslora=True)
    edit_config(use_rslora=False)(d)
    config = json.loads((d / "adapter_config.json").read_text())
    assert vllm_scaling(config) == 0.5  # 8 / 16, where leantune trained with 8 / sqrt(16) = 2
    assert {a.scaling for a in adapter_modules(tiny_llama).values()} == {2.0}
