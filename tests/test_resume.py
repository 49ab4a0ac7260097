"""A real process killed with SIGKILL mid-run, at several points, then rerun: every answer once,
equal to an uninterrupted run, nothing finished generated again."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .job_script import JOB

ROOT = Path(__file__).resolve().parents[1]


def _stored(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results WHERE error IS NULL").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _run(model, store, out, *extra, kill_after=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tests.job_script", model, str(store), str(out), *extra],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
        return json.loads(Path(out).read_text())
    deadline = time.monotonic() + 600
    while _stored(store) < kill_after:  # poll the store: kill once that many answers are committed
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return None


@pytest.mark.slow
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "seeded-sampling"])
def test_sigkill_at_several_points_then_resume(llama_path, tmp_path, sample):
    extra = ("--sample",) if sample else ()
    reference = _run(llama_path, tmp_path / "ref.sqlite", tmp_path / "ref.json", *extra)
    assert reference["cached"] == 0 and len(reference["answers"]) == len(JOB)

    store = tmp_path / "job.sqlite"
    _run(llama_path, store, tmp_path / "a.json", *extra, kill_after=4)
    first_kill = _stored(store)
    _run(llama_path, store, tmp_path / "b.json", *extra, kill_after=first_kill + 10)
    before_rerun = _stored(store)
    assert 4 <= first_kill < before_rerun < len(JOB)
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    resumed = _run(llama_path, store, tmp_path / "c.json", *extra)
    assert resumed["answers"] == reference["answers"]
    assert resumed["cached"] == before_rerun  # every committed answer reused ...
    assert resumed["generated"] == len(JOB) - before_rerun  # ... and only the rest generated
    assert _stored(store) == len(JOB)
