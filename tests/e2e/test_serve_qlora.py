"""`leantune serve` on a QLoRA run, as a user starts it: the server holds the base in 4 bits as the run trained
over it (said in the start-up line), and the official openai client gets the answer the run's own
`leantune generate` gives over its 4-bit base, token for token."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("bitsandbytes")
pytest.importorskip("fastapi")

from e2e.serve_proc import leantune_serve  # noqa: E402
from e2e.test_train_cli import write_chat_data  # noqa: E402


def test_a_qlora_run_is_served_over_its_4bit_base_to_the_openai_client(tmp_path, tiny_llama_dir):
    from leantune.config import from_dict
    from leantune.infer.generate import generate_text, load_for_inference
    from leantune.quant import spec_of
    from leantune.train.loop import run

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    cfg = from_dict({"model": str(tiny_llama_dir), "output_dir": str(tmp_path / "qrun"), "dtype": "fp32",
                     "device": "cpu", "data": {"path": str(data), "max_length": 64},
                     "lora": {"rank": 4, "alpha": 8}, "quant": {"bits": 4, "compute_dtype": "fp32"},
                     "train": {"max_steps": 3, "lr": 1e-2, "progress": False, "tensorboard": False,
                               "eval_every": 0, "warmup_steps": 0}})
    run(cfg, console=lambda s: None)
    messages = [{"role": "user", "content": "the capital of france"}]
    model, tok = load_for_inference(str(tmp_path / "qrun"), dtype="fp32", device="cpu")
    assert spec_of(model).bits == 4
    expected = generate_text(model, tok, messages, max_new_tokens=8)

    with leantune_serve(str(tmp_path / "qrun"), "--dtype", "fp32", "--device", "cpu",
                        "--served-model-name", "tiny") as served:
        url = served.url
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny", "qrun"]
        got = client.chat.completions.create(model="qrun", messages=messages, max_tokens=8, temperature=0)
        assert got.choices[0].message.content.strip() == expected
    err = served.err
    assert "base: 4-bit nf4, double quant through bitsandbytes, as run qrun trained over it (QLoRA)" in err, err
