"""`leantune export SRC --all` on the tiny Llama with a LoRA adapter: every registered format into one
folder, each with its fidelity report, one table at the end and export_all.json; a format that fails is a
row with its one-line error while the others run; a rerun keeps what is finished and redoes only what is
not; a user's folder is never taken over."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.cli.main import main
from leantune.export.base import EXPORTERS, Exporter
from leantune.export.run import all_plan

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from leantune.adapters.lora import inject_lora
    from leantune.checkpoint.peft_format import save_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.2)
    return save_adapter(model, tmp_path_factory.mktemp("all") / "adapter", base_model_name_or_path=str(tiny_llama_dir))


@pytest.fixture(autouse=True)
def only_builtin_formats(monkeypatch):
    """--all exports every registered format: formats other test files register (a toy one) stay out."""
    for name, cls in list(EXPORTERS.items()):
        if not cls.__module__.startswith("leantune.export."):
            monkeypatch.delitem(EXPORTERS, name)


class Broken(Exporter):   # registered by the test that needs it, and removed after
    quants = ("X",)
    default_quant = "X"

    def write(self, model, tokenizer, facts, folder, out, quant, options):
        raise RuntimeError("the broken format broke\nsecond line")


def test_all_writes_every_format_with_its_report_and_one_table_and_resumes(adapter_dir, tmp_path, capsys):
    out = tmp_path / "exports"
    calibration = tmp_path / "calibration.txt"   # GPTQ and AWQ calibrate; an adapter folder has no training data
    calibration.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(32)))
    assert main(["export", str(adapter_dir), "--all", "--out", str(out), "--quiet",
                 "--calibration", str(calibration)]) == 0
    printed = capsys.readouterr().out
    plan = [(f, q) for f, q, e, _ in all_plan() if e is not None]
    assert {("gguf", "Q8_0"), ("gguf", "Q4_K_M"), ("int8", "W8A16"), ("int8", "LLM_INT8")} <= set(plan)
    summary = json.loads((out / "export_all.json").read_text())
    rows = {(r["format"], r["quant"]): r for r in summary["formats"]}
    assert set(rows) == set(plan) and all(r["status"] == "ok" for r in rows.values())
    for (fmt, quant), r in rows.items():
        artifact = out / r["artifact"]
        assert artifact.exists(), artifact
        report = json.loads((out / f"{r['artifact'].removesuffix('.gguf')}.fidelity.json").read_text())
        assert report["format"] == fmt and report["quant"] == quant and report["merge"]["method"] == "lora"
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"{fmt:<8}{quant:<10}"))
        assert line.rstrip().endswith("ok")
        if report["model"]:   # a format with a read-back: scored against the merged model
            # 8-bit and up agree closely; 4- and 5-bit formats on a random tiny model (flat logits) less so
            assert report["model"]["top1_agreement"] > (0.8 if quant in ("Q8_0", "W8A16", "LLM_INT8") else 0.5), (fmt, quant)
            assert f"{100 * report['model']['top1_agreement']:.1f}" in line
    q8 = json.loads((out / "adapter-Q8_0.fidelity.json").read_text())
    assert q8["tensors"] and 8 < q8["bits_per_weight"] < 9           # GGUF keeps its per-tensor part
    # rerun: everything finished is kept, untouched; a format whose report is missing is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "adapter-W8A16.fidelity.json").unlink()
    assert main(["export", str(adapter_dir), "--all", "--out", str(out), "--quiet"]) == 0
    rows = {(r["format"], r["quant"]): r for r in json.loads((out / "export_all.json").read_text())["formats"]}
    assert rows[("int8", "W8A16")]["status"] == "ok"
    assert all(r["status"] == "done earlier (kept)" for k, r in rows.items() if k != ("int8", "W8A16"))
    assert (out / "adapter-W8A16.fidelity.json").is_file()
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamps.items()
               if n.startswith("adapter-") and "W8A16" not in n)


def test_a_failing_format_is_a_row_and_the_others_still_run(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Broken, "format", "broken", raising=False)
    monkeypatch.setitem(EXPORTERS, "broken", Broken)
    out = tmp_path / "exports"
    assert main(["export", str(adapter_dir), "--all", "--out", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("broken"))
    assert "failed: the broken format broke" in line and "second line" not in printed
    rows = {r["format"]: r for r in json.loads((out / "export_all.json").read_text())["formats"]}
    assert rows["broken"]["status"].startswith("failed") and "RuntimeError" in rows["broken"]["traceback"]
    assert rows["int8"]["status"] == "ok" and rows["gguf"]["status"] == "ok"


def test_all_refuses_a_quant_and_a_users_folder_in_one_line(adapter_dir, tmp_path, capsys):
    assert main(["export", str(adapter_dir), "--all", "--quant", "Q8_0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drop --quant" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    assert main(["export", str(adapter_dir), "--all", "--out", str(mine), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "earlier --all did not write" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "x").exists()


def test_all_on_a_run_folder_writes_into_the_run_and_scores_the_runs_held_out_data(tiny_llama_dir, tmp_path):
    from .test_export_cli import _train

    run = _train(tiny_llama_dir, tmp_path, "lora")
    assert main(["export", str(run), "--all", "--quiet"]) == 0
    summary = json.loads((run / "export" / "export_all.json").read_text())
    assert summary["formats"] and all(r["status"] == "ok" for r in summary["formats"])
    report = json.loads((run / "export" / "lora-W8A16.fidelity.json").read_text())
    assert report["model"]["held_out"].startswith("the run's ")   # its eval split, not the built-in prose
