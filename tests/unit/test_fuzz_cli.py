"""Fuzzing the CLI with hypothesis: configs (any key, type, value), datasets (random JSON/JSONL/CSV/text
content, encodings, empty fields, wrong roles), adapter folders (random bytes in adapter_config.json and
the safetensors header), GGUF headers and merge recipes. Every example calls the CLI in process
(`leantune.cli.main.main`) in a sandbox folder and must either work (exit 0) or exit 2 with one `error:`
line: never a traceback, never another exit code, never a file outside the output folder.

Bounded for the default suite (derandomized, a few dozen examples per target; LEANTUNE_FUZZ_SCALE=N runs
N times as many). The figures from a long run are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from leantune.cli.main import main

SCALE = int(os.environ.get("LEANTUNE_FUZZ_SCALE", "1"))
RUNS = {"examples": 0, "errors": 0}  # tallied for the report: examples run, clear errors among them


def fuzz(n: int):
    # No shrinking: one CLI call is ~1 s, and shrinking a failure took minutes; the failing input is
    # reported as drawn.
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def snapshot(root: Path, skip: Path | None) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if skip is None or not (p == skip or skip in p.parents)}


def cli(argv: list[str], sandbox: Path, out: Path | None = None) -> tuple[int, str]:
    """Run the CLI in `sandbox`; assert it worked or failed with one clear line and wrote nothing outside
    `out`. Any exception escaping main() is a traceback a user would see: the test fails with it."""
    before = snapshot(sandbox, out)
    cwd, so, se = os.getcwd(), io.StringIO(), io.StringIO()
    os.chdir(sandbox)
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
    err = se.getvalue()
    RUNS["examples"] += 1
    assert code in (0, 2), f"exit {code} for {argv}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    if code == 2:
        RUNS["errors"] += 1
        lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "error:" in ln[:20]]
        assert len(lines) == 1 and len(lines[0]) < 2000, f"not one error line for {argv}:\n{err[-3000:]}"
    new = snapshot(sandbox, out) - before
    assert not new, f"{argv} wrote outside its output folder: {sorted(new)[:5]}"
    return code, err


@contextlib.contextmanager
def sandbox():
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


# ---------------------------------------------------------------------------------------------
# Values of any type, text that stresses parsers

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                    texts, st.sampled_from(["", "0", "-1", "1e9", "auto", "null", "[]", "{}", "nan", "../x", "/dev/null"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(texts, c, max_size=3)),
                      max_leaves=6)


def schema_keys() -> list[str]:
    import dataclasses

    from leantune import adapters  # noqa: F401  (method sections)
    from leantune.config import RunConfig

    keys = []
    for f in dataclasses.fields(RunConfig):
        if f.name in ("output_dir", "sections"):  # where output goes is the folder the check watches
            continue
        keys.append(f.name)
        t = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(t):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(t) if g.name != "cache_dir"]
    return keys + ["lora.rank", "lora.alpha", "lora.targets", "lora.dropout", "method", "quant.bits"]


KEYS = schema_keys()


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fuzz-data") / "d.jsonl"
    chat = {"messages": [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "jumps over"}]}
    p.write_text((json.dumps(chat) + "\n") * 6)
    return p


def set_key(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for k in path:
        cfg = cfg.setdefault(k, {}) if isinstance(cfg.get(k, {}), dict) else {}
    cfg[last] = value


@fuzz(20)
@given(edits=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), texts), values), min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=60), texts))
def test_fuzz_config(tiny_llama_dir, chat_file, edits, raw):
    with sandbox() as box:
        cfg = {"model": str(tiny_llama_dir), "output_dir": "out", "data": {"path": str(chat_file), "max_length": 32},
               "lora": {"rank": 2}, "train": {"max_steps": 1, "batch_size": 2, "progress": False,
                                              "tensorboard": False, "save_every": 0, "eval_every": 0}}
        for key, value in edits:
            set_key(cfg, key, value)
        path = box / "c.yaml"
        if raw is None:
            path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        else:
            path.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
        cli(["train", str(path)], box, out=box / "out")


# ---------------------------------------------------------------------------------------------
# Datasets

ROLES = st.sampled_from(["user", "assistant", "system", "tool", "", "USER", "bot", None, 3])
FIELDS = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                          "text", "role", "content", "from", "value", "x"])
message = st.fixed_dictionaries({}, optional={"role": ROLES, "content": st.one_of(texts, values), "from": ROLES,
                                              "value": texts})
record = st.one_of(
    st.dictionaries(FIELDS, st.one_of(texts, values, st.lists(message, max_size=3)), max_size=4),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    values)


def encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace") if encoding != "utf-8-sig" else b"\xef\xbb\xbf" + text.encode()


@fuzz(30)
@given(records=st.lists(record, max_size=6), ext=st.sampled_from(["jsonl", "json", "csv", "txt"]),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"]), junk=st.one_of(st.none(), st.binary(max_size=40)),
       fmt=st.sampled_from([None, "auto", "chat", "alpaca", "prompt_completion", "text"]))
def test_fuzz_dataset(tiny_llama_dir, records, ext, encoding, junk, fmt):
    with sandbox() as box:
        path = box / f"data.{ext}"
        if ext == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        elif ext == "json":
            text = json.dumps(records, ensure_ascii=False)
        elif ext == "csv":
            buf = io.StringIO()
            cols = sorted({k for r in records if isinstance(r, dict) for k in r})
            w = csv.writer(buf)
            w.writerow(cols)
            for r in records:
                w.writerow([str(r.get(c, "")) if isinstance(r, dict) else str(r) for c in cols])
            text = buf.getvalue()
        else:
            text = "\n".join(str(r) for r in records)
        raw = encode(text, encoding) + (junk or b"")
        path.write_bytes(raw)
        argv = ["inspect-data", "--model", str(tiny_llama_dir), "--data", str(path), "--max-length", "32"]
        cli(argv + (["--format", fmt] if fmt else []), box)


# ---------------------------------------------------------------------------------------------
# Adapter folders, GGUF headers, merge recipes: each mutates a real file


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    argv = ["train", "--model", str(tiny_llama_dir), "--data.path", str(chat_file), "--output_dir", str(out),
            "--train.max_steps", "1", "--train.progress", "false", "--train.tensorboard", "false",
            "--lora.rank", "2", "--data.max_length", "32"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out


def mutate(raw: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(raw)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


def header_edits(limit: int):
    return st.lists(st.tuples(st.integers(0, limit), st.integers(0, 255)), max_size=4)


@fuzz(20)
@given(config=st.one_of(st.none(), values, st.binary(max_size=80)), edits=header_edits(200),
       cut=st.one_of(st.none(), st.integers(0, 400)), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_adapter_folder(trained_run, config, edits, cut, length):
    with sandbox() as box:
        ad = box / "adapter"
        shutil.copytree(trained_run / "adapter", ad)
        if config is not None:
            (ad / "adapter_config.json").write_bytes(config if isinstance(config, bytes) else
                                                     json.dumps(config).encode())
        st_file = ad / "adapter_model.safetensors"
        raw = st_file.read_bytes()
        if length is not None:
            raw = struct.pack("<Q", length) + raw[8:]
        st_file.write_bytes(mutate(raw, [(8 + p, v) for p, v in edits], cut))
        cli(["merge", str(ad), "--out", str(box / "merged")], box, out=box / "merged")


@pytest.fixture(scope="module")
def gguf_file(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["export", str(tiny_llama_dir), "--quant", "F32", "--out", str(out), "--no-eval", "--quiet"]) == 0
    return out


@fuzz(15)
@given(edits=header_edits(600), cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_fuzz_gguf_header(gguf_file, edits, cut):
    with sandbox() as box:
        g = box / "m.gguf"
        g.write_bytes(mutate(gguf_file.read_bytes(), edits, cut))
        old = os.environ.get("LEANTUNE_CACHE")
        os.environ["LEANTUNE_CACHE"] = str(box / "cache")  # the converted folder is this command's output
        try:
            cli(["generate", str(g), "--prompt", "hi", "--max-new-tokens", "2", "--raw"], box, out=box / "cache")
        finally:
            os.environ.pop("LEANTUNE_CACHE") if old is None else os.environ.__setitem__("LEANTUNE_CACHE", old)


RECIPE_KEYS = st.sampled_from(["adapters", "weights", "method", "density", "rank", "seed", "output", "out", "base", "x"])


@fuzz(20)
@given(recipe=st.dictionaries(RECIPE_KEYS, values, max_size=6),
       method=st.sampled_from(["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "nope"]),
       n=st.integers(0, 3), raw=st.one_of(st.none(), st.binary(max_size=50)))
def test_fuzz_merge_recipe(trained_run, recipe, method, n, raw):
    with sandbox() as box:
        shutil.copytree(trained_run / "adapter", box / "a")
        base = {"adapters": ["a"] * n, "method": method, "out": "merged"}
        base.update({k: v for k, v in recipe.items() if k not in ("out",)})
        path = box / "recipe.yaml"
        path.write_bytes(raw if raw is not None else yaml.safe_dump(base, allow_unicode=True).encode())
        cli(["merge", str(path)], box, out=box / "merged")


def test_fuzz_tally():
    """Prints the figures the docs quote (run last in this file)."""
    print(f"fuzz: {RUNS['examples']} examples, {RUNS['errors']} clear errors, 0 tracebacks")
