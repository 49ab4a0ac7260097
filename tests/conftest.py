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


def make_lora_adapter(base_path, into, target_modules=("q_proj", "v_proj", "o_proj")) -> str:
    """A LoRA adapter made locally with peft, with random (non-zero) weights so that it changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=list(target_modules), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(into)
    return str(into)


@pytest.fixture(scope="session")
def lora_adapter(llama_path, tmp_path_factory):
    pytest.importorskip("peft")
    return make_lora_adapter(llama_path, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Generators track emissions by default, into ./emissions.csv: keep those files out of the repository."""
    monkeypatch.chdir(tmp_path)
