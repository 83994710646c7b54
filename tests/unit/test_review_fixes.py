"""Edge cases found in review: text overrides stay text, target shorthands, data splitting, torn metrics."""

import json

import pytest

import leantune.adapters  # noqa: F401  (registers every method's config section)
from leantune import config as C
from leantune.cli.main import _overrides, build_parser


def test_text_overrides_are_not_yaml_parsed():
    ns = build_parser().parse_args(["train", "--data.system_prompt", "You are #1 at math", "--output_dir", "2024-06-01",
                                    "--lora.rank", "8", "--lora.targets", "[q_proj, v_proj]"])
    ov = _overrides(ns)
    assert ov["data.system_prompt"] == "You are #1 at math"
    assert ov["output_dir"] == "2024-06-01"
    assert ov["lora.rank"] == 8 and ov["lora.targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("given,expected", [("q_proj,v_proj", ["q_proj", "v_proj"]), ("q_proj", ["q_proj"]),
                                            ("all-linear", "all-linear"), (r".*\.q_proj", r".*\.q_proj")])
def test_target_shorthands(given, expected):
    cfg = C.from_dict({"model": "m", "data": {"path": "d"}, "lora": {"targets": given}})
    assert cfg.lora.targets == expected


def test_empty_section_then_override():
    cfg = C.from_dict({"model": "m", "data": {"path": "d"}, "lora": None}, {"lora.rank": 4})
    assert cfg.lora.rank == 4


def test_jsonl_with_unicode_line_separators_and_csv_multiline(tmp_path):
    from leantune.data.records import read_records

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a\u2028b\u2029c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(p)[0]["text"] == "a\u2028b\u2029c"
    c = tmp_path / "d.csv"
    c.write_text('prompt,completion\n"line one\nline two",ok\n')
    assert read_records(c)[0]["prompt"] == "line one\nline two"


def test_torn_metrics_line_is_skipped(tmp_path):
    from leantune.train.metrics import MetricsLog, read_metrics
    from leantune.train.plot import loss_svg

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert loss_svg(tmp_path / "metrics.jsonl").startswith("<svg")
    log = MetricsLog(tmp_path, tensorboard=False, resume_step=1)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_demo_never_deletes_a_folder_that_is_not_a_demo_run(tmp_path):
    from leantune.demo import _remove_previous_demo
    from leantune.errors import ConfigError

    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not an earlier demo run"):
        _remove_previous_demo(tmp_path)
    assert (tmp_path / "mine.txt").exists()
