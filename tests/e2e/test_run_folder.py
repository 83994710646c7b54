"""The run folder's layout has one owner (checkpoint/run_folder.py), and the facts a consumer needs travel
with each adapter in its `leantune.json` sidecar: an adapter copied out of its run still merges and
generates as it was trained (quantized base, chat template), and folders written before the sidecar
existed still read their run's config.yaml."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.checkpoint.run_folder import (
    SIDECAR,
    RunFolder,
    find_model_and_adapter,
    read_run_info,
    run_folder_of,
    run_info,
    run_quant,
)
from leantune.cli.main import main

from .test_train_cli import base_args, write_chat_data

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, tmp_path_factory):
    """A finished QLoRA run with a checkpoint, trained with a chat template from a file that is gone afterwards."""
    tmp = tmp_path_factory.mktemp("sidecar")
    template = tmp / "template.jinja"
    template.write_text(TEMPLATE)
    out = tmp / "run"
    argv = base_args(tiny_llama_dir, write_chat_data(tmp / "d.jsonl", n=16), out, "--quant.bits", "4",
                     "--train.max_steps", "2", "--train.save_every", "1", "--train.eval_every", "0", "--dtype", "fp32",
                     "--data.chat_template", str(template), "--data.system_prompt", "be brief")
    assert main(argv) == 0
    template.unlink()  # the run must not depend on the file it was trained with
    return out


def test_every_adapter_and_checkpoint_carries_the_runs_facts(qlora_run, tiny_llama_dir):
    run = RunFolder(qlora_run)
    folders = [run.adapter, *run.checkpoints()]
    assert len(folders) == 3
    for folder in folders:
        info = json.loads((folder / SIDECAR).read_text())
        assert info["method"] == "lora" and info["base_model"] == str(tiny_llama_dir) and info["dtype"] == "fp32"
        assert info["quant"]["bits"] == 4 and info["quant"]["type"] == "nf4"
        assert info["chat_template"] == TEMPLATE and info["system_prompt"] == "be brief"


def test_the_layout_is_read_in_one_place(qlora_run):
    run = RunFolder(qlora_run)
    assert find_model_and_adapter(str(qlora_run))[1] == run.adapter
    for inside in (qlora_run, run.adapter, run.checkpoints()[-1]):
        assert run_folder_of(inside) == RunFolder(qlora_run.resolve())
    assert run_folder_of(qlora_run.parent) is None
    assert run_info(str(qlora_run)) == read_run_info(run.adapter)


def test_a_copied_qlora_adapter_merges_into_the_base_it_was_trained_on(qlora_run, tmp_path, capsys):
    copied = shutil.copytree(qlora_run / "adapter", tmp_path / "elsewhere" / "adapter")
    assert run_folder_of(copied) is None and run_quant(str(copied)).bits == 4
    assert main(["merge", str(qlora_run), "--out", str(tmp_path / "from-run"), "--no-report"]) == 0
    assert main(["merge", str(copied), "--out", str(tmp_path / "from-copy")]) == 0
    err = capsys.readouterr().err
    assert err.count("folded into the dequantized 4-bit base it was trained against") == 2
    assert "not inside its run folder, so there is no run data to measure the merge on" in err
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval() for d in ("from-run", "from-copy"))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "from-copy").chat_template == TEMPLATE


def test_a_run_written_before_sidecars_reads_its_config(qlora_run, tmp_path):
    old = shutil.copytree(qlora_run, tmp_path / "old-run")
    for sidecar in old.rglob(SIDECAR):
        sidecar.unlink()
    info = read_run_info(old / "adapter")
    assert info is not None and info.quant["bits"] == 4 and info.method == "lora"
    assert run_quant(str(old / "checkpoints" / RunFolder(old).checkpoints()[-1].name)).bits == 4
    plain = shutil.copytree(old / "adapter", tmp_path / "loose-adapter")
    assert read_run_info(plain) is None and run_quant(str(plain)) is None
