"""Data parallelism: real processes started by ``accelerate launch`` over a tiny model (gloo on the CPU).

``accelerate launch --cpu --num_processes 2`` starts a *single* process in accelerate 1.x (multi-CPU goes
through mpirun and a hostfile), so the launches here use ``--multi_gpu``, which runs torchrun; with no
visible GPU (``CUDA_VISIBLE_DEVICES=""``) the processes meet over gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simple_generation import SimpleGenerator
from simple_generation.distributed import (
    DataParallel,
    DistributedGenerationError,
    SingleProcess,
    balanced_shards,
    current_distribution,
)

from .dist_script import MAX_NEW_TOKENS, PREFIX, PROMPTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "dist_script.py"
LAUNCH_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return env


def _launch_command(num_processes: int, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *extra]


def _launch(model: str, out_dir: Path, *script_args: str, num_processes: int = 2,
            timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a launch to its end; a launch that hangs raises subprocess.TimeoutExpired (the test fails)."""
    command = _launch_command(num_processes, _free_port(), "--num_machines", "1",
                              str(SCRIPT), model, str(out_dir), *script_args)
    return subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ranks(out_dir: Path, world_size: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world_size)]


@pytest.fixture(scope="module")
def single_process_answers(llama_path):
    """The greedy answers of a plain, single-process run: what every rank must return."""
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    assert isinstance(generator.distribution, SingleProcess)
    return generator(PROMPTS, batch_size=1, max_new_tokens=MAX_NEW_TOKENS, temperature=0, show_progress_bar=False)


# ------------------------------------------------------------------ in-process: the split


def test_no_launcher_means_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    distribution = current_distribution()
    assert isinstance(distribution, SingleProcess)
    monkeypatch.setenv("WORLD_SIZE", "1")  # `accelerate launch --num_processes 1` or torchrun with one process
    assert isinstance(current_distribution(), SingleProcess)


def test_balanced_shards_by_length_not_count():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shards = balanced_shards(order, lengths, 2)
    assert shards == [[0], list(range(1, 11))]
    assert sorted(i for shard in shards for i in shard) == list(range(len(lengths)))


def test_balanced_shards_cover_everything_once_and_keep_order():
    lengths = [37, 5, 12, 12, 80, 1, 1, 44, 9, 23, 17]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for world_size in (1, 2, 3, 4, 11, 16):
        shards = balanced_shards(order, lengths, world_size)
        assert len(shards) == world_size
        assert sorted(i for shard in shards for i in shard) == sorted(order)
        for shard in shards:  # each shard is processed in the global order (longest first)
            assert shard == [i for i in order if i in shard]
        loads = [sum(lengths[i] for i in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(lengths)
        assert shards == balanced_shards(order, lengths, world_size)  # deterministic
    assert balanced_shards([0], [5], 3) == [[0], [], []]
    assert balanced_shards([], [], 2) == [[], []]


class _FakeState:
    """Stands in for accelerate's process state; the exchange is replayed from prepared payloads."""

    def __init__(self, rank: int, world_size: int):
        self.num_processes, self.process_index, self.local_process_index = world_size, rank, rank
        self.is_main_process, self.device = rank == 0, "cpu"


def test_each_process_loads_on_its_own_device():
    state = _FakeState(0, 2)
    state.device = torch.device("cuda", 1)  # what accelerate gives local rank 1 (only a name here: no GPU needed)
    distribution = DataParallel(state)
    assert distribution.load_device(None, False) == torch.device("cuda", 1)
    assert distribution.load_device("cuda", False) == torch.device("cuda", 1)  # bare "cuda": this process's GPU
    assert distribution.load_device("cuda:0", False) == "cuda:0"  # an explicit index is the user's choice
    assert distribution.load_device("cpu", False) == "cpu"
    assert distribution.load_device(None, True) is None  # a device_map places each copy itself
    assert SingleProcess().load_device(None, False) is None


def test_failure_on_another_rank_raises_here_with_partial_answers():
    distribution = DataParallel(_FakeState(0, 2))
    order, lengths = [0, 1, 2, 3], [4, 3, 2, 1]
    failure = {"ok": False, "error": "RuntimeError: boom", "indices": [1], "partial": {}, "stats": {},
               "fingerprint": (4, hash(tuple(order)), hash(tuple(lengths)))}
    distribution._all_gather = lambda payload: [payload, failure]
    with pytest.raises(DistributedGenerationError, match=r"rank 1 of 2 .*RuntimeError: boom") as caught:
        distribution.run(order, lengths, lambda shard: {i: f"answer {i}" for i in shard})
    assert caught.value.failed_ranks == {1: "RuntimeError: boom"}
    assert caught.value.partial == {0: "answer 0", 3: "answer 3"}
    assert isinstance(caught.value, RuntimeError)


def test_different_prompts_on_different_ranks_raise():
    distribution = DataParallel(_FakeState(0, 2))  # rank 0: a non-main state would quiet this process's logs
    other = {"ok": True, "results": {0: "x"}, "stats": {}, "fingerprint": (1, 0, 0)}
    distribution._all_gather = lambda payload: [payload, other]
    with pytest.raises(RuntimeError, match="different prompts"):
        distribution.run([0, 1], [3, 3], lambda shard: {i: "y" for i in shard})


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_two_processes_return_every_answer_in_order(llama_path, single_process_answers, tmp_path):
    cases = ["11:4", "1:4", "0:4", "13:auto", "5:1", "13:auto:oom", "13:4:prefix"]
    emissions = tmp_path / "emissions"
    result = _launch(llama_path, tmp_path, *[arg for case in cases for arg in ("--case", case)],
                     "--emissions-dir", str(emissions))
    assert result.returncode == 0, result.stderr[-4000:]
    # emissions.csv: one row per call with prompts (an empty call returns [] at once), by the main process only
    rows = (emissions / "emissions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + sum(not case.startswith("0:") for case in cases)
    ranks = _ranks(tmp_path, 2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["is_main"] for r in ranks] == [True, False]
    single = SimpleGenerator(llama_path, device="cpu", track_emissions=False, prefix_cache=False)
    prefixed_answers = single([PREFIX + p for p in PROMPTS], batch_size=1, max_new_tokens=MAX_NEW_TOKENS,
                              temperature=0, show_progress_bar=False)
    for record in ranks:
        assert record["kind"] == "DataParallel" and record["world_size"] == 2 and record["device"] == "cpu"
        for case in cases:
            n = int(case.split(":")[0])
            expected = prefixed_answers if case.endswith("prefix") else single_process_answers[:n]
            assert record["cases"][case] == expected, (record["rank"], case)
        # each rank keeps its own prefix cache; last_run sums what the ranks reused
        assert record["last_run"]["13:4:prefix"]["prefix_cached_tokens"] > 0
        # last_run covers the whole call (both processes' prompts and tokens), on every rank
        assert record["last_run"]["11:4"]["prompts"] == 11
        assert record["last_run"]["11:4"]["generated_tokens"] == ranks[0]["last_run"]["11:4"]["generated_tokens"]
        assert record["last_run"]["11:4"]["generated_tokens"] > 6 * MAX_NEW_TOKENS  # more than rank 0's share
        # one batch per prompt at batch size 1 (static: a generate call; continuous: a prefill)
        assert record["last_run"]["5:1"]["batches"] == 5
        if record["last_run"]["5:1"]["engine"] == "continuous":  # its forward passes: a prefill and the steps
            assert record["last_run"]["5:1"]["forward_passes"] == 5 * MAX_NEW_TOKENS
        # batch_size="auto" searches per process: rank 1 backed off (its 6-7 prompts: 7 -> 3 -> 1) while rank 0
        # kept its whole share in one batch; every rank reports the whole run's retries and the smallest size
        assert record["last_run"]["13:auto:oom"]["oom_retries"] >= 2
        assert record["last_run"]["13:auto:oom"]["batch_size"] <= 2
        assert record["last_run"]["13:auto"]["oom_retries"] == 0
        assert (record["last_run"]["11:4"]["energy_kwh"] is not None) is record["is_main"]


@pytest.mark.slow
def test_failure_on_one_rank_fails_the_launch_everywhere(llama_path, tmp_path):
    result = _launch(llama_path, tmp_path, "--case", "11:4", "--fail-rank", "1", timeout=60)  # no hang
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    for rank in (0, 1):  # rank 0 raised too (it did not wait at the gather, nor was it only killed)
        error = json.loads((tmp_path / f"rank{rank}.error.json").read_text())
        assert error["type"] == "DistributedGenerationError"
        assert "rank 1 of 2" in error["message"] and "injected failure on rank 1" in error["message"]
        assert list(error["failed_ranks"]) == ["1"]


@pytest.mark.slow
def test_crashed_rank_does_not_hang_the_others(llama_path, tmp_path):
    result = _launch(llama_path, tmp_path, "--case", "11:4", "--crash-rank", "1", timeout=60)  # no hang
    assert result.returncode != 0
    assert re.search(r"exitcode\s*:\s*3\b", result.stderr)  # torchrun's report names the process that died


@pytest.mark.slow
def test_two_machines_on_localhost(llama_path, single_process_answers, tmp_path):
    """`--num_machines 2 --machine_rank 0|1 --main_process_ip ...`: one launch per "machine", 1 process each."""
    port = _free_port()
    machines = [
        subprocess.Popen(
            _launch_command(2, port, "--num_machines", "2", "--machine_rank", str(machine), "--main_process_ip",
                            "127.0.0.1", str(SCRIPT), llama_path, str(tmp_path), "--case", "11:4", "--case", "1:2"),
            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for machine in (0, 1)
    ]
    try:
        outputs = [machine.communicate(timeout=LAUNCH_TIMEOUT_S) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    assert [m.returncode for m in machines] == [0, 0], [err[-3000:] for _, err in outputs]
    for record in _ranks(tmp_path, 2):
        assert record["world_size"] == 2
        assert record["cases"]["11:4"] == single_process_answers[:11]
        assert record["cases"]["1:2"] == single_process_answers[:1]


@pytest.mark.slow
def test_accelerate_launch_cpu_flag(llama_path, single_process_answers, tmp_path):
    """The issue's spelling, `accelerate launch --cpu --num_processes 2`: accelerate 1.x starts one process
    here (see the module docstring); whatever it starts, each process returns every answer, in order."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "--num_machines", "1", str(SCRIPT), llama_path, str(tmp_path), "--case", "11:4", "--case", "0:4"]
    result = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(tmp_path.glob("rank*.json"))]
    assert records and all(r["world_size"] == len(records) for r in records)
    for record in records:
        assert record["cases"]["11:4"] == single_process_answers[:11]
        assert record["cases"]["0:4"] == []


@pytest.mark.slow
def test_empty_list_on_one_rank_raises_everywhere_instead_of_hanging(llama_path, tmp_path):
    result = _launch(llama_path, tmp_path, "--case", "5:4:emptyon1", timeout=90)  # a hang fails with TimeoutExpired
    assert result.returncode != 0
    for rank in range(2):
        error = json.loads((tmp_path / f"rank{rank}.error.json").read_text())
        assert "different prompts" in error["message"]


@pytest.mark.slow
def test_empty_call_on_every_rank_returns_empty(llama_path, tmp_path):
    result = _launch(llama_path, tmp_path, "--case", "0:4", "--case", "3:4")
    assert result.returncode == 0, result.stderr[-3000:]
    for record in _ranks(tmp_path, 2):
        assert record["cases"]["0:4"] == [] and len(record["cases"]["3:4"]) == 3


@pytest.mark.slow
def test_store_and_seeded_sampling_under_two_processes(llama_path, single_process_answers, tmp_path):
    """No prompt done twice across ranks (a rerun finds every answer stored), and seeded samples equal
    a single process's."""
    result = _launch(llama_path, tmp_path, "--case", "11:4:store", "--case", "11:4:store", "--case", "11:2:seed")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(tmp_path, 2)
    import sqlite3

    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 11
    for record in ranks:
        assert record["cases"]["11:4:store"] == single_process_answers[:11]
    # the second identical call: every answer from the store, on every rank
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    seeded = generator(PROMPTS[:11], batch_size=3, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0,
                       seed=2024, show_progress_bar=False)
    for record in ranks:
        assert record["cases"]["11:2:seed"] == seeded
        assert record["last_run"]["11:4:store"]["cached"] == 11  # the last of the two store cases
