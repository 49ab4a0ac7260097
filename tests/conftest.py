"""Session fixtures: tiny real checkpoints written to disk and loaded back like hub models."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from simple_generation.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: str(build_tiny_checkpoint(root / arch, arch)) for arch in ("llama", "gpt2", "t5", "bart")}


@pytest.fixture(scope="session")
def llama_path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def gpt2_path(tiny_checkpoints):
    return tiny_checkpoints["gpt2"]


@pytest.fixture(scope="session")
def t5_path(tiny_checkpoints):
    return tiny_checkpoints["t5"]


from .prompts import PROMPTS  # noqa: E402,F401 - re-exported for the tests


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Generators track emissions by default, into ./emissions.csv: keep those files out of the repository."""
    monkeypatch.chdir(tmp_path)
