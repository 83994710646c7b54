"""One training run per output_dir: a second `train` on a folder a live run holds is refused with the pid,
before anything loads; a lock left by a dead process (kill -9) is taken over with a note; the lock is gone
when the run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from leantune.cli.main import main
from leantune.errors import ConfigError
from leantune.io.lock import held

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]}


def _argv(tmp_path, model):
    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps(CHAT) + "\n") * 4)
    return ["train", "--model", str(model), "--data.path", str(data), "--output_dir", str(tmp_path / "run"),
            "--train.progress", "false", "--train.tensorboard", "false", "--train.max_steps", "1"]


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_held_by_a_live_run_is_refused_before_loading(tmp_path, tiny_llama_dir, live_pid, monkeypatch, capsys):
    from leantune.train import setup

    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "leantune.lock").write_text(f"{live_pid} {socket.gethostname()}\n")
    assert main(_argv(tmp_path, tiny_llama_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"pid {live_pid}" in err and "in use" in err
    assert (tmp_path / "run" / "leantune.lock").read_text().split()[0] == str(live_pid)  # not ours to remove


def test_a_stale_lock_is_taken_over_with_a_note_and_released_at_the_end(tmp_path, tiny_llama_dir, capsys):
    pid = dead_pid()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "leantune.lock").write_text(f"{pid} {socket.gethostname()}\n")
    assert main(_argv(tmp_path, tiny_llama_dir)) == 0
    out = capsys.readouterr()
    assert f"no longer running (pid {pid}); taking the lock over" in out.out + out.err
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "leantune.lock").exists()


def test_the_lock_holds_this_pid_while_held_and_a_second_holder_is_refused(tmp_path):
    lock = tmp_path / "f" / "leantune.lock"
    with held(lock, "output_dir f"):
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(ConfigError, match=f"in use by a running leantune process \\(pid {os.getpid()}\\)"):
            with held(lock, "output_dir f"):
                pass
        assert lock.exists()  # the refused second holder did not remove the first one's lock
    assert not lock.exists()


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
    lock = tmp_path / "leantune.lock"
    lock.write_text("4242 some-other-host\n")
    with pytest.raises(ConfigError, match="locked by a run on host some-other-host .*delete"):
        with held(lock, "output_dir x"):
            pass
