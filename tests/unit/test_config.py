"""The config: typed, validated, overridable, with errors that name the closest valid key."""

import pytest

import leantune.adapters  # noqa: F401  (registers every method's config section)
from leantune import config as C
from leantune.errors import ConfigError


def minimal(**extra):
    return {"model": "m", "data": {"path": "d.jsonl"}, **extra}


def test_defaults_and_overrides_coerce_types():
    cfg = C.from_dict(minimal(), {"lora.rank": "8", "train.lr": "1e-4", "data.packing": "false",
                                  "lora.targets": ["q_proj", "v_proj"], "train.max_steps": 5})
    assert cfg.lora.rank == 8 and cfg.train.lr == 1e-4 and cfg.data.packing is False
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.train.max_steps == 5
    assert cfg.lora.alpha == 32.0 and cfg.train.schedule == "cosine"


@pytest.mark.parametrize("key,suggestion", [("lora.rnak", "lora.rank"), ("rank", "lora.rank"),
                                            ("data.pth", "data.path"), ("learning_rate", "train.lr"),
                                            ("train.epoch", "train.epochs"), ("lora_alpha", "lora.alpha")])
def test_unknown_key_names_the_closest_valid_key(key, suggestion):
    raw = minimal()
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = 1
    with pytest.raises(ConfigError, match=suggestion.replace(".", r"\.")):
        C.from_dict(raw)


def test_bad_values_name_the_field_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"train.schedule.*cosine"):
        C.from_dict(minimal(train={"schedule": "cosin"}))
    with pytest.raises(ConfigError, match=r"lora.rank must be an integer"):
        C.from_dict(minimal(lora={"rank": 2.5}))
    with pytest.raises(ConfigError, match=r"data.packing must be true or false"):
        C.from_dict(minimal(data={"path": "x", "packing": "maybe"}))


def test_every_field_has_help_and_round_trips_through_yaml(tmp_path):
    import yaml

    for fi in C.fields_of():
        assert fi.help, fi.name
    cfg = C.from_dict(minimal(lora={"rank": 4, "targets": ["q_proj"]}))
    p = tmp_path / "c.yaml"
    p.write_text(C.dump_yaml(cfg))
    again = C.from_dict(yaml.safe_load(p.read_text()))
    assert again == cfg


def test_the_saved_config_holds_its_own_methods_section_only():
    """config.yaml (to_dict) carries the core sections and the section the method reads: DoRA reads lora's,
    full fine-tuning none; no other method's defaults."""
    methods = {n: C.METHODS[n].section for n in ("lora", "dora", "ia3", "prefix", "full")}
    for method, section in methods.items():
        saved = C.to_dict(C.from_dict(minimal(method=method)))
        assert {"data", "train", "quant"} <= set(saved), method
        assert set(saved) & set(C.SECTIONS) == ({section} if section else set()), method
    assert methods["dora"] == "lora" and methods["full"] is None


def test_train_help_documents_every_field_with_its_default(capsys):
    from leantune.cli.main import main

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fi in C.fields_of():
        assert f"--{fi.name}" in text, fi.name
    assert "(default: 16)" in text and "(default: cosine)" in text


def test_relative_paths_in_a_config_file_are_read_from_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.jsonl").write_text("{}\n")
    cfgfile = tmp_path / "sub" / "c.yaml"
    cfgfile.write_text("model: some/model\ndata: {path: train.jsonl}\n")
    cfg = C.load(cfgfile)
    assert cfg.data.path == str(tmp_path / "sub" / "train.jsonl")
    assert cfg.model == "some/model"
