"""`leantune serve` as a user starts it: a subprocess on a free port serves the base and every finished run
under --adapters by name, refuses a broken one with its reason and keeps serving the rest, and answers."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")
from e2e.serve_proc import leantune_serve  # noqa: E402


def test_serve_command_serves_finished_runs(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name in ("legal", "broken"):
        run = runs / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"model: {tiny_llama_dir}\n")
        (run / "summary.json").write_text("{}")
        m.save_pretrained(run / "adapter")
    cfg = runs / "broken" / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "r": "four"}))
    with leantune_serve(str(tiny_llama_dir), "--adapters", str(runs), "--served-model-name", "tiny") as served:
        url = served.url
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["tiny", "legal"]
        r = httpx.post(url + "/v1/completions", json={"model": "legal", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    err = served.err
    assert "refused adapter broken:" in err and "r must be a positive integer" in err
