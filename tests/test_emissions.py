"""Carbon emissions: codecarbon's offline tracker writes one emissions.csv row per generation call."""

import csv
import errno
import logging
import os
import socket
import subprocess
import uuid

import pytest

from simple_generation import SimpleGenerator
from simple_generation.emissions import codecarbon_columns, track_emissions

from .conftest import PROMPTS

pytest.importorskip("codecarbon")

FOREIGN = "id,score\n1,0.5\n2,0.7\n"


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "simple_generation" and r.levelno >= logging.WARNING]


def _work():
    return sum(i * i for i in range(20000))


def test_every_call_writes_a_row_and_fills_last_run(llama_path, tmp_path):
    out = tmp_path / "emissions"
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(out))
    generator(PROMPTS[:4], max_new_tokens=4, temperature=0, show_progress_bar=False)
    first = generator.last_run
    generator(PROMPTS[4:6], max_new_tokens=4, temperature=0, show_progress_bar=False)
    second = generator.last_run
    rows = _rows(out / "emissions.csv")
    assert len(rows) == 2
    assert all(row["project_name"] == llama_path for row in rows)
    for row, run in zip(rows, (first, second)):
        assert run.energy_kwh is not None and run.energy_kwh >= 0
        assert run.energy_kwh == pytest.approx(float(row["energy_consumed"]))
        assert run.emissions_kg_co2eq == pytest.approx(float(row["emissions"]))
    assert (first.prompts, second.prompts) == (4, 2)
    assert first.generated_tokens > 0 and first.wall_time_s > 0 and first.tokens_per_second > 0


def test_default_directory_is_the_working_directory(llama_path, tmp_path):
    # conftest runs every test in its own tmp_path
    SimpleGenerator(llama_path, device="cpu")(PROMPTS[:1], max_new_tokens=2, show_progress_bar=False)
    assert len(_rows(tmp_path / "emissions.csv")) == 1


def test_track_emissions_false_writes_nothing(llama_path, tmp_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False, emissions_dir=str(tmp_path / "e"))
    generator(PROMPTS[:2], max_new_tokens=2, show_progress_bar=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "emissions.csv").exists()
    assert generator.last_run.energy_kwh is None


def test_a_failing_call_is_still_recorded(llama_path, tmp_path):
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(tmp_path))
    with pytest.raises(Exception):  # noqa: B017 - any failure inside generation
        generator(PROMPTS[:2], max_new_tokens=2, show_progress_bar=False, logits_processor=[_Boom()])
    assert len(_rows(tmp_path / "emissions.csv")) == 1


class _Boom:
    def __call__(self, input_ids, scores):
        raise RuntimeError("boom")


# ---------------------------------------------------------------- never touch a file we did not write


def test_a_users_own_emissions_csv_is_left_untouched(llama_path, tmp_path, caplog):
    (tmp_path / "emissions.csv").write_text(FOREIGN, encoding="utf-8")
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="simple_generation"):
        answers = generator(PROMPTS[:2], max_new_tokens=2, temperature=0, show_progress_bar=False)
        generator(PROMPTS[:1], max_new_tokens=2, temperature=0, show_progress_bar=False)
    assert len(answers) == 2
    assert (tmp_path / "emissions.csv").read_text(encoding="utf-8") == FOREIGN
    assert not [p.name for p in tmp_path.iterdir() if ".bak" in p.name]
    fallback = tmp_path / "emissions-simple-generation.csv"
    assert len(_rows(fallback)) == 2
    assert generator.last_run.energy_kwh is not None
    named = [m for m in _warnings(caplog) if str(tmp_path / "emissions.csv") in m and str(fallback) in m]
    assert len(named) == 1, _warnings(caplog)  # one warning naming both files, not one per call


def test_when_both_files_are_foreign_the_call_fails_before_generating(llama_path, tmp_path):
    (tmp_path / "emissions.csv").write_text(FOREIGN, encoding="utf-8")
    (tmp_path / "emissions-simple-generation.csv").write_text("a;b\n", encoding="utf-8")
    entered = []
    with pytest.raises(ValueError, match="emissions-simple-generation.csv"):
        with track_emissions(True, str(tmp_path), "x"):
            entered.append(True)
    assert not entered
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path / "emissions-simple-generation.csv")):
        generator(PROMPTS[:1], max_new_tokens=2, show_progress_bar=False)
    assert (tmp_path / "emissions.csv").read_text(encoding="utf-8") == FOREIGN
    assert (tmp_path / "emissions-simple-generation.csv").read_text(encoding="utf-8") == "a;b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emissions-simple-generation.csv", "emissions.csv"]


def test_codecarbon_files_are_appended_to_and_only_they(tmp_path):
    with track_emissions(True, str(tmp_path), "first"):
        _work()
    with track_emissions(True, str(tmp_path), "second") as reading:
        _work()
    assert reading.csv_path == str(tmp_path / "emissions.csv")
    rows = _rows(tmp_path / "emissions.csv")
    assert [r["project_name"] for r in rows] == ["first", "second"] and list(rows[0]) == codecarbon_columns()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emissions.csv"]
    # codecarbon's columns in another order were not written by codecarbon: not ours either
    other = tmp_path / "other"
    other.mkdir()
    reordered = ",".join(reversed(codecarbon_columns())) + "\n"
    (other / "emissions.csv").write_text(reordered, encoding="utf-8")
    with track_emissions(True, str(other), "x") as reading:
        _work()
    assert reading.csv_path == str(other / "emissions-simple-generation.csv")
    assert (other / "emissions.csv").read_text(encoding="utf-8") == reordered


def test_an_unwritable_emissions_file_is_reported_with_its_path_and_os_error(llama_path, tmp_path, caplog,
                                                                             monkeypatch):
    import pandas

    target = tmp_path / "emissions.csv"

    def refuse(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pandas.DataFrame, "to_csv", refuse)
    generator = SimpleGenerator(llama_path, device="cpu", emissions_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="simple_generation"):
        answers = generator(PROMPTS[:2], max_new_tokens=2, temperature=0, show_progress_bar=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    messages = [m for m in _warnings(caplog) if str(target) in m and "Permission denied" in m]
    assert messages, _warnings(caplog)
    assert "final_emissions_data" not in " ".join(_warnings(caplog))
    assert generator.last_run.energy_kwh is not None  # measured, only not written


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_reported(tmp_path, caplog):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="simple_generation"):
            with track_emissions(True, str(directory), "x") as reading:
                result = _work()
    finally:
        directory.chmod(0o700)
    assert result > 0 and reading.energy_kwh is not None and reading.csv_path is None
    assert any(str(directory / "emissions.csv") in m and "Permission denied" in m for m in _warnings(caplog))


# ---------------------------------------------------------------- offline means offline


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every DNS lookup and connection attempt."""
    attempts = []

    def refuse(name):
        def guard(*args, **kwargs):
            attempts.append((name, args[1:] if name.startswith("socket.") else args))
            raise OSError(errno.ENETUNREACH, f"network disabled by the test ({name})")

        return guard

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


@pytest.mark.parametrize("where", ["cwd", "home", "env"])
def test_the_offline_tracker_never_touches_the_network(where, llama_path, tmp_path, monkeypatch, no_network):
    try:
        from codecarbon.core import electricitymaps_api

        electricitymaps_api.reset_cache()  # no cooldown left by another test may hide a request
    except (ImportError, AttributeError):  # older codecarbon: co2_signal, without a cache
        pass
    token = f"token-{uuid.uuid4().hex}"
    config = ("[codecarbon]\n"
              f"electricitymaps_api_token = {token}\n"
              f"co2_signal_api_token = {token}\n"
              "emissions_endpoint = http://emissions.example.com/post\n"
              "output_methods = csv,api\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    if where == "cwd":
        (tmp_path / ".codecarbon.config").write_text(config, encoding="utf-8")
    elif where == "home":
        (home / ".codecarbon.config").write_text(config, encoding="utf-8")
    else:
        monkeypatch.setenv("CODECARBON_ELECTRICITYMAPS_API_TOKEN", token)
        monkeypatch.setenv("CODECARBON_EMISSIONS_ENDPOINT", "http://emissions.example.com/post")
    out = tmp_path / "out"
    with track_emissions(True, str(out), "x") as reading:
        _work()
    assert no_network == []
    assert reading.energy_kwh is not None and reading.energy_kwh > 0
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=True, emissions_dir=str(out))
    generator(PROMPTS[:2], max_new_tokens=2, temperature=0, show_progress_bar=False)
    assert no_network == []
    assert len(_rows(out / "emissions.csv")) == 2


# ---------------------------------------------------------------- hardware detection once per process


def test_the_second_tracked_call_starts_no_subprocess(tmp_path, monkeypatch):
    # codecarbon >= 3.3 caches its hardware probe per process; we cache the rest (its `lscpu` call)
    pytest.importorskip("codecarbon.core.hardware_cache", reason="codecarbon < 3.3 probes the hardware per tracker")
    with track_emissions(True, str(tmp_path), "first") as first:
        _work()
    started = []

    class NoPopen:
        def __init__(self, args, *rest, **kwargs):
            started.append(args)
            raise OSError(errno.EPERM, "subprocesses disabled by the test")

    monkeypatch.setattr(subprocess, "Popen", NoPopen)
    with track_emissions(True, str(tmp_path), "second") as second:
        _work()
    monkeypatch.undo()
    assert started == []
    assert first.energy_kwh is not None and second.energy_kwh is not None
    rows = _rows(tmp_path / "emissions.csv")
    assert [r["project_name"] for r in rows] == ["first", "second"]
    for key in ("cpu_count", "cpu_model", "os", "ram_total_size"):
        assert rows[1][key] == rows[0][key]  # what was detected once is reused, not lost
