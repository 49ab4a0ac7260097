"""Session fixtures: tiny real checkpoints written to disk and loaded back like hub models."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from simple_generation.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: str(build_tiny_checkpoint(root / arch, arch)) for arch in ("llama", "gpt2", "t5")}


@pytest.fixture(scope="session")
def llama_path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def gpt2_path(tiny_checkpoints):
    return tiny_checkpoints["gpt2"]


@pytest.fixture(scope="session")
def t5_path(tiny_checkpoints):
    return tiny_checkpoints["t5"]


# Prompts of very different lengths (1 to ~150 tokens) and content.
PROMPTS = [
    "Hi",
    "Tell me what is two plus two?",
    "Write a poem in the style of Leonardo da Vinci about the sea, the sky and the mountains at dawn. " * 4,
    "a",
    "Translate this sentence to Spanish, please: the quick brown fox jumps over the lazy dog.",
    "Unicode: caffè, naïve, über, 你好 🙂",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and more numbers 42 17",
    "What kind of noises did dinosaurs make? " * 6,
    "Once upon a time",
    "Researchers evaluate models on thousands of prompts, and engineers generate data for training. " * 2,
    "The library runs text generation over checkpoints:",
    "   leading and trailing spaces   ",
]


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Generators track emissions by default, into ./emissions.csv: keep those files out of the repository."""
    monkeypatch.chdir(tmp_path)
