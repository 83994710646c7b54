"""`leantune lint` on runs leantune trained, and `deploy_targets` in `leantune train`: a run whose result a
target cannot serve is refused before the model loads; a lint of a run names each conflict and exits 2;
--vllm-command prints the command that serves the runs."""

from __future__ import annotations

import json
import shlex

import pytest

from leantune.cli.main import main

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]}


def _train_argv(tmp_path, model, out, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps(CHAT) + "\n") * 4)
    return ["train", "--model", str(model), "--data.path", str(data), "--output_dir", str(out),
            "--train.progress", "false", "--train.tensorboard", "false", "--train.max_steps", "1",
            "--data.eval_fraction", "0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """A LoRA run trained with deploy_targets [vllm, llamacpp], and a DoRA run trained without any."""
    tmp = tmp_path_factory.mktemp("lint-runs")
    lora, dora = tmp / "legal", tmp / "dora"
    assert main(_train_argv(tmp, tiny_llama_dir, lora, "--lora.rank", "12", "--deploy_targets", "vllm,llamacpp")) == 0
    assert main(_train_argv(tmp, tiny_llama_dir, dora, "--method", "dora", "--lora.rank", "4")) == 0
    return {"lora": lora, "dora": dora}


def test_train_refuses_a_deploy_target_conflict_before_loading(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from leantune.train import setup

    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setattr(setup, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded first"))
    out = tmp_path / "run"
    assert main(_train_argv(tmp_path, tiny_llama_dir, out, "--method", "dora", "--deploy_targets", "vllm")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: vLLM does not serve DoRA adapters: use method lora, or drop vllm from deploy_targets")
    assert not out.exists()  # the folder the lock made for this run is gone again


def test_a_clean_run_lints_ok_and_as_json(runs, capsys):
    assert main(["lint", str(runs["lora"])]) == 0
    assert capsys.readouterr().out.strip() == f"{runs['lora']} (vllm, llamacpp): ok"
    assert main(["lint", str(runs["lora"] / "adapter"), "--target", "vllm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["sources"][0]["findings"] == [] and report["sources"][0]["targets"] == ["vllm"]


def test_a_dora_run_is_refused_for_each_target_naming_the_option(runs, capsys):
    assert main(["lint", str(runs["dora"]), "--target", "vllm"]) == 2
    out = capsys.readouterr().out
    assert "error [vllm] use_dora: vLLM does not serve DoRA adapters" in out
    assert main(["lint", str(runs["dora"]), "--json"]) == 2
    findings = json.loads(capsys.readouterr().out)["sources"][0]["findings"]
    assert {(f["target"], f["option"]) for f in findings} == {("vllm", "use_dora"), ("llamacpp", "use_dora")}


def test_vllm_command_for_runs(runs, tiny_llama_dir, capsys):
    assert main(["lint", str(runs["lora"]), f"support={runs['lora'] / 'adapter'}", "--vllm-command",
                 "--port", "9000"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    adapter = (runs["lora"] / "adapter").resolve()
    assert argv == ["vllm", "serve", str(tiny_llama_dir), "--host", "127.0.0.1", "--port", "9000", "--enable-lora",
                    "--lora-modules", f"legal={adapter}", f"support={adapter}",
                    "--max-lora-rank", "16", "--max-loras", "2"]  # rank 12 -> the next allowed value, 16
    assert main(["lint", str(runs["lora"]), str(runs["dora"]), "--vllm-command"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "dora: use_dora" in captured.err


def test_a_train_config_is_linted_before_training(tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model: m\nmethod: ia3\ndata: {path: d.jsonl}\n")
    assert main(["lint", str(cfg), "--target", "llamacpp"]) == 2
    assert "llama.cpp serves LoRA adapters only, not method ia3" in capsys.readouterr().out
    cfg.write_text("model: m\ndata: {path: d.jsonl}\nlora: {rslora: true}\n")
    assert main(["lint", str(cfg)]) == 0  # a warning only
    assert "warning [llamacpp] lora.rslora" in capsys.readouterr().out


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    assert main(["lint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no adapter_config.json" in err
    assert main(["lint", str(tmp_path), "--target", "tgi"]) == 2
    assert "invalid choice" in capsys.readouterr().err
