"""Deployment lint (leantune/checkpoint/deploy_rules.py) and the vLLM hand-off (leantune/serve/vllm.py), rule by
rule, on adapters saved by real PEFT (the live reference for what each option writes) and by leantune; the same
rules over a training config (deploy_targets), before anything loads."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantune import adapters  # noqa: F401  (registers the methods' config sections)
from leantune.adapters.lora import inject_lora
from leantune.checkpoint.deploy_rules import (MAX_LORA_RANKS, adapter_folder, check_deploy_targets, config_findings,
                                              errors, lint_adapter, read_adapter, serve_rank, vllm_findings)
from leantune.checkpoint.peft_format import save_adapter
from leantune.config import from_dict
from leantune.errors import ConfigError, ModelError
from leantune.serve.vllm import command_line, handoff

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402

Q = ["q_proj", "v_proj"]
# PEFT config -> the options each target refuses (errors) and warns about, by the option the finding names.
PEFT_CASES = {
    "plain": (dict(r=8, lora_alpha=16, target_modules="all-linear"), {}, {}),
    "gaussian init": (dict(r=8, lora_alpha=8, target_modules=Q, init_lora_weights="gaussian"), {}, {}),
    "rsLoRA": (dict(r=16, lora_alpha=8, target_modules=Q, use_rslora=True), {}, {"llamacpp": {"use_rslora"}}),
    "rank_pattern": (dict(r=4, lora_alpha=8, target_modules=Q, rank_pattern={"q_proj": 24}), {}, {}),
    "DoRA": (dict(r=4, lora_alpha=8, target_modules=Q, use_dora=True),
             {"vllm": {"use_dora"}, "llamacpp": {"use_dora"}}, {}),
    "modules_to_save": (dict(r=4, lora_alpha=8, target_modules=Q, modules_to_save=["lm_head"]),
                        {"vllm": {"modules_to_save"}, "llamacpp": {"modules_to_save"}}, {}),
    "lora_bias": (dict(r=4, lora_alpha=8, target_modules=Q, lora_bias=True),
                  {"vllm": {"lora_bias"}, "llamacpp": {"lora_bias"}}, {}),
    "bias all": (dict(r=4, lora_alpha=8, target_modules=Q, bias="all"), {"vllm": {"bias"}, "llamacpp": {"bias"}}, {}),
    "PiSSA": (dict(r=4, lora_alpha=8, target_modules=Q, init_lora_weights="pissa"),
              {"vllm": {"init_lora_weights"}, "llamacpp": {"init_lora_weights"}}, {}),
    "OLoRA": (dict(r=4, lora_alpha=8, target_modules=Q, init_lora_weights="olora"),
              {"vllm": {"init_lora_weights"}, "llamacpp": {"init_lora_weights"}}, {}),
    "alpha_pattern": (dict(r=4, lora_alpha=8, target_modules=Q, alpha_pattern={"v_proj": 2}),
                      {"llamacpp": {"alpha_pattern"}}, {}),
    "rsLoRA with rank_pattern": (dict(r=4, lora_alpha=8, target_modules=Q, use_rslora=True, rank_pattern={"q_proj": 8}),
                                 {"llamacpp": {"use_rslora"}}, {}),
    "rank over 512": (dict(r=8, lora_alpha=8, target_modules=Q, rank_pattern={"q_proj": 520}),
                      {"vllm": {"rank_pattern"}}, {}),
}


def _peft_save(base, out: Path, config) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), config).save_pretrained(out)
    return out


def _by_target(findings, severity: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        if f.severity == severity:
            out.setdefault(f.target, set()).add(f.option)
    return out


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_each_rule_on_an_adapter_saved_by_peft(base, tmp_path, case):
    kwargs, refused, warned = PEFT_CASES[case]
    d = _peft_save(base, tmp_path / "a", LoraConfig(task_type="CAUSAL_LM", **kwargs))
    findings = lint_adapter(d)
    assert _by_target(findings, "error") == refused, [str(f) for f in findings]
    assert _by_target(findings, "warning") == warned, [str(f) for f in findings]
    for f in findings:  # one line that names the option's fix
        assert "\n" not in f.message and ":" in f.message


def test_an_ia3_adapter_is_refused_by_both_runtimes_by_its_peft_type(base, tmp_path):
    d = _peft_save(base, tmp_path / "ia3", IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"]))
    findings = lint_adapter(d)
    assert _by_target(findings, "error") == {"vllm": {"peft_type"}, "llamacpp": {"peft_type"}}
    assert all("IA3" in f.message and "leantune merge" in f.message for f in findings)


def test_findings_are_by_target(base, tmp_path):
    d = _peft_save(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=Q, use_dora=True))
    assert {f.target for f in lint_adapter(d, ["vllm"])} == {"vllm"}
    assert {f.target for f in lint_adapter(d, ["llamacpp"])} == {"llamacpp"}


def _edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "adapter_config.json").read_text())
    config.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, refused", [
    ("alora_invocation_tokens", [5, 6], {"vllm": {"alora_invocation_tokens"}}),  # llama.cpp serves aLoRA
    ("layer_replication", [[0, 2]], {"vllm": {"layer_replication"}, "llamacpp": {"layer_replication"}}),
    ("use_qalora", True, {"vllm": {"use_qalora"}, "llamacpp": {"use_qalora"}}),
    ("r", 0, {"vllm": {"r"}}),
])
def test_config_fields_peft_writes_for_other_features(base, tmp_path, field, value, refused):
    d = _peft_save(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=Q))
    _edit_config(d, **{field: value})
    assert _by_target(lint_adapter(d), "error") == refused


def test_a_broken_weights_file_is_found_from_its_header(base, tmp_path):
    d = _peft_save(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != key}, str(path))
    assert any("not its partner" in f.message for f in lint_adapter(d, ["vllm"]))
    tensors[key] = tensors[key][:, :3].contiguous()  # B (out, 3) against A (4, in)
    save_file(tensors, str(path))
    assert any("do not share a rank" in f.message for f in lint_adapter(d, ["llamacpp"]))
    tensors = load_file(str(path))
    tensors[key.replace("lora_B.weight", "lora_down.weight")] = tensors.pop(key)
    save_file(tensors, str(path))
    assert any("not a LoRA A/B weight" in f.message for f in lint_adapter(d, ["llamacpp"]))


def test_unreadable_or_incomplete_folders_are_one_line_errors(base, tmp_path):
    d = _peft_save(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    (d / "adapter_model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        read_adapter(d)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="incomplete"):
        read_adapter(d)
    with pytest.raises(ConfigError, match="holds no adapter_config.json"):
        adapter_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# leantune's own adapters


@pytest.mark.parametrize("rslora", [False, True])
def test_leantune_adapters_pass_vllm_and_rslora_only_warns_for_llamacpp(tiny_llama, tmp_path, rslora):
    inject_lora(tiny_llama, 8, 16, targets="all-linear", rslora=rslora)
    d = save_adapter(tiny_llama, tmp_path / "a", base_model_name_or_path="tiny", rank=8, alpha=16, rslora=rslora)
    findings = lint_adapter(d)
    assert errors(findings) == []
    assert _by_target(findings, "warning") == ({"llamacpp": {"use_rslora"}} if rslora else {})


# ---------------------------------------------------------------------------------------------
# The vLLM command


def test_serve_rank_is_the_smallest_allowed_value_at_least_the_rank():
    for r in range(1, 600):
        expected = next((m for m in MAX_LORA_RANKS if m >= r), None)
        assert serve_rank(r) == expected
    assert (serve_rank(8), serve_rank(12), serve_rank(300), serve_rank(513)) == (8, 16, 320, None)


def test_handoff_builds_vllms_command_with_the_rank_of_the_largest_adapter(base, tmp_path, tiny_llama_dir):
    a = _peft_save(base, tmp_path / "a", LoraConfig(r=8, lora_alpha=16, target_modules=Q))
    b = _peft_save(base, tmp_path / "b", LoraConfig(r=4, lora_alpha=8, target_modules=Q, rank_pattern={"v_proj": 24}))
    for d in (a, b):
        _edit_config(d, base_model_name_or_path=str(tiny_llama_dir))
    argv, findings = handoff({"legal": a, "support": b}, port=8123)
    assert findings == []
    assert argv == ["vllm", "serve", str(tiny_llama_dir), "--host", "127.0.0.1", "--port", "8123", "--enable-lora",
                    "--lora-modules", f"legal={a.resolve()}", f"support={b.resolve()}",
                    "--max-lora-rank", "32", "--max-loras", "2"]
    argv, _ = handoff({"legal": a}, max_loras=4)
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and argv[argv.index("--max-loras") + 1] == "4"
    assert command_line(["vllm", "serve", "my model"]) == "vllm serve 'my model'"


def test_handoff_reports_what_vllm_refuses_and_a_base_other_than_the_adapters(base, tmp_path, tiny_llama_dir):
    d = _peft_save(base, tmp_path / "d", LoraConfig(r=8, lora_alpha=16, target_modules=Q, use_dora=True))
    _edit_config(d, base_model_name_or_path=str(tiny_llama_dir))
    argv, findings = handoff({"dora": d}, "other/base")
    assert argv[2] == "other/base"
    assert {(f.severity, f.option) for f in findings} == {("error", "dora: use_dora"),
                                                          ("warning", "dora: base_model_name_or_path")}
    with pytest.raises(ConfigError, match="cannot be a vLLM model name"):
        handoff({"a b": d}, "x")
    _edit_config(d, base_model_name_or_path=None)
    with pytest.raises(ConfigError, match="--base MODEL"):
        handoff({"dora": d})


# ---------------------------------------------------------------------------------------------
# deploy_targets in a training config


def _cfg(**raw):
    return from_dict({"model": "m", "data": {"path": "d.jsonl"}, **raw})


def test_dora_with_vllm_is_refused_naming_the_option_and_both_fixes():
    (f,) = config_findings(_cfg(method="dora", deploy_targets=["vllm"]))
    assert (f.target, f.option, f.severity) == ("vllm", "method", "error")
    assert f.message.startswith("vLLM does not serve DoRA adapters: use method lora, or drop vllm from deploy_targets")
    with pytest.raises(ConfigError, match="^vLLM does not serve DoRA") as e:
        check_deploy_targets(_cfg(method="dora", deploy_targets=["vllm", "llamacpp"]), console=lambda s: None)
    assert "1 more" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw, expected", [
    (dict(deploy_targets=[]), set()),
    (dict(deploy_targets=["vllm", "llamacpp"]), set()),
    (dict(method="ia3", deploy_targets=["vllm"]), {("vllm", "method", "error")}),
    (dict(method="prefix", deploy_targets=["llamacpp"]), {("llamacpp", "method", "error")}),
    (dict(method="full", deploy_targets=["vllm", "llamacpp"]), set()),  # a whole model serves as a base
    (dict(lora={"rank": 600}, deploy_targets=["vllm", "llamacpp"]), {("vllm", "lora.rank", "error")}),
    (dict(lora={"rank": 512}, deploy_targets=["vllm"]), set()),
    (dict(lora={"init": "loftq"}, quant={"bits": 4}, deploy_targets=["vllm"]), {("vllm", "lora.init", "error")}),
    (dict(lora={"rslora": True}, deploy_targets=["vllm", "llamacpp"]), {("llamacpp", "lora.rslora", "warning")}),
])
def test_config_rules(raw, expected):
    assert {(f.target, f.option, f.severity) for f in config_findings(_cfg(**raw))} == expected


def test_warnings_are_printed_and_do_not_stop_the_run():
    notes = []
    check_deploy_targets(_cfg(lora={"rslora": True}, deploy_targets=["llamacpp"]), console=notes.append)
    assert len(notes) == 1 and notes[0].startswith("note: rsLoRA")


def test_config_and_adapter_rules_agree_on_what_leantune_saves(tiny_llama, tmp_path):
    """The config rule (lora.rank > 512 for vllm) and the adapter rule see the same run the same way."""
    inject_lora(tiny_llama, 520, 520, targets=["q_proj"])
    d = save_adapter(tiny_llama, tmp_path / "a", base_model_name_or_path="tiny")
    assert _by_target(lint_adapter(d, ["vllm"]), "error") == {"vllm": {"r"}}
    assert _by_target(config_findings(_cfg(lora={"rank": 520}, deploy_targets=["vllm"])), "error") == \
        {"vllm": {"lora.rank"}}


def test_unknown_deploy_target_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="deploy_targets\\[0\\] must be one of vllm, llamacpp; got 'vllm-cpu'"):
        _cfg(deploy_targets=["vllm-cpu"])


# ---------------------------------------------------------------------------------------------
# Against the vLLM loader restated in tests/parity/test_vllm_format.py


def test_lint_refuses_every_break_the_restated_vllm_loader_refuses(tiny_llama_dir, tmp_path):
    """Each of the parity test's broken adapters: vLLM's checks (restated there) and the lint agree that it is
    refused. Two of its breaks need the architecture's layer names, which an adapter folder alone does not
    give (a LoRA on a norm, keys without the inner model. prefix): the parity test keeps those."""
    from tests.parity.test_vllm_format import BREAKS, save, vllm_problems
    from transformers import AutoModelForCausalLM

    needs_architecture = {"module vLLM lacks", "path vLLM lacks"}
    for name, (mutate, _) in BREAKS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        d = save(model, tmp_path / name.replace(" ", "-"), rank=8, alpha=16, targets="all-linear")
        assert vllm_problems(d, 8, model.config) == [] and lint_adapter(d, ["vllm"]) == []
        mutate(d)
        assert vllm_problems(d, 8, model.config), name
        if name in needs_architecture:
            continue
        try:
            config, shapes = read_adapter(d)
        except ModelError:
            continue  # refused as unreadable (no weights file)
        assert errors(vllm_findings(config, shapes, max_lora_rank=8)), name


def test_handoff_warns_that_vllm_serves_a_qlora_runs_adapter_over_the_16_bit_base(base, tmp_path, tiny_llama_dir):
    from leantune.checkpoint.run_folder import RunInfo, write_run_info

    a = _peft_save(base, tmp_path / "q", LoraConfig(r=8, lora_alpha=16, target_modules=Q))
    _edit_config(a, base_model_name_or_path=str(tiny_llama_dir))
    argv, findings = handoff({"q": a})
    assert findings == []                      # no sidecar: nothing known about the base it trained over
    write_run_info(a, RunInfo(method="lora", base_model=str(tiny_llama_dir), dtype="fp32",
                              quant={"bits": 4, "type": "nf4", "double_quant": True}))
    argv2, findings = handoff({"q": a})
    assert argv2 == argv
    assert [(f.severity, f.option) for f in findings] == [("warning", "q: quant.bits")]
    assert "4-bit nf4" in findings[0].message and "16-bit base" in findings[0].message
