"""A run's config.yaml carries the core sections and its own method's section, never the sections of other
methods: a method registered at run time (here the contract tests' toy) must not leak into the config.yaml of
every later run, which a process without that method (merge, export) would refuse as an unknown key."""

from __future__ import annotations

import yaml

from leantune import config as C
from leantune.cli.main import main

from . import toy_method
from .test_toy_method import train_args, write_chat_data


def test_a_lora_run_after_a_plugin_registered_has_no_plugin_section_and_round_trips(tiny_llama_dir, tmp_path,
                                                                                     monkeypatch):
    assert toy_method.NAME in C.SECTIONS  # registered when toy_method was imported
    run = tmp_path / "run"
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    assert main(train_args(tiny_llama_dir, data, run, "--train.max_steps", "1", "--lora.rank", "4")) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "lora" and saved["lora"]["rank"] == 4
    assert toy_method.NAME not in saved
    assert not set(saved) & (set(C.SECTIONS) - {"lora"}), "another method's section is in config.yaml"

    # A process that never imported the toy: its section is unknown there, and the file still loads whole.
    monkeypatch.delitem(C.SECTIONS, toy_method.NAME)
    monkeypatch.delitem(C.METHODS, toy_method.NAME)
    again = C.load(run / "config.yaml")
    assert again.lora.rank == 4 and C.to_dict(again) == saved
