"""`leantune doctor` and the lock set: the versions CI installs satisfy the ranges users install with, and
doctor tells a user when a version in use is not the tested one."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from leantune.cli.doctor import diagnose, render, tested_versions, version_warnings
from leantune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_lock_set_satisfies_every_range_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = tested_versions()
    assert {"torch", "transformers", "tokenizers", "peft", "bitsandbytes", "gguf", "safetensors", "datasets"} <= set(pins)
    for text in requirements:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not in the lock set"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"


def test_an_untested_version_is_named_with_the_fix_and_a_local_build_tag_is_not():
    tested = {"transformers": "5.24.0", "torch": "2.13.0"}
    warnings = version_warnings({"transformers": "5.30.1", "torch": "2.13.0+cpu", "peft": None}, tested)
    assert len(warnings) == 1
    assert "transformers 5.30.1 is not the tested 5.24.0" in warnings[0] and "constraints.txt" in warnings[0]


def test_doctor_reports_device_bf16_and_bitsandbytes(capsys):
    report = diagnose()
    assert not report.failures, report.failures
    assert report.device["device"] in ("cpu", "cuda") or report.device["device"].startswith("cuda")
    assert report.device["dtype_auto"] in ("float32", "bfloat16")
    assert report.bitsandbytes["ok"] and 0 < report.bitsandbytes["nf4_relative_error"] < 0.2
    text = render(report)
    assert "bf16" in text and "bitsandbytes" in text and "transformers" in text
    assert main(["doctor"]) == 0
    assert "device" in capsys.readouterr().out
