"""Loading options: LoRA, quantization, compile, attention kernels, placement, dtype, init summary.

Each test would fail if its option were silently ignored: it compares answers, inspects the loaded modules,
the dtype or the generation config, or reads what was logged.
"""

import importlib.util
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from simple_generation import SimpleGenerator
from simple_generation.model_options import choose_placement

from .conftest import PROMPTS
from .reference import hf_greedy

GIB = 2**30
MAX_NEW = 8
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------ LoRA
def _peft_reference(llama_path, adapter, prompts):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(llama_path)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    return hf_greedy(llama_path, prompts, MAX_NEW, model_and_tokenizer=(model, tokenizer))


@pytest.mark.parametrize("merge_lora", [True, False])
def test_lora_answers_equal_peft_and_differ_from_base(llama_path, lora_adapter, merge_lora):
    from peft import PeftModel

    prompts = PROMPTS[:6]
    generator = SimpleGenerator(llama_path, device="cpu", lora_weights=lora_adapter, merge_lora=merge_lora,
                                track_emissions=False)
    assert isinstance(generator.model, PeftModel) is (not merge_lora)
    answers = generator(prompts, batch_size=3, max_new_tokens=MAX_NEW, temperature=0, skip_prompt=True,
                        show_progress_bar=False)
    base = hf_greedy(llama_path, prompts, MAX_NEW)
    assert answers != base
    assert answers == _peft_reference(llama_path, lora_adapter, prompts)


def test_missing_lora_adapter_fails_before_the_weights_load(llama_path, tmp_path):
    import shutil

    no_weights = tmp_path / "no-weights"  # config and tokenizer only: loading the weights would fail first
    shutil.copytree(llama_path, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(OSError, match="LoRA adapter"):
        SimpleGenerator(str(no_weights), device="cpu", lora_weights=str(tmp_path / "no-adapter"),
                        track_emissions=False)


# ------------------------------------------------------------------ quantization
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
@pytest.mark.parametrize("option", [{"load_in_8bit": True}, {"load_in_4bit": True}])
def test_bitsandbytes_without_cuda_says_so(llama_path, option):
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        SimpleGenerator(llama_path, track_emissions=False, **option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_bitsandbytes_config_passed_directly_without_cuda_says_so(llama_path):
    from transformers import BitsAndBytesConfig

    with pytest.raises(RuntimeError, match="CUDA GPU"):
        SimpleGenerator(llama_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), track_emissions=False)


def test_8bit_and_4bit_together_is_an_error(llama_path):
    with pytest.raises(ValueError, match="not both"):
        SimpleGenerator(llama_path, load_in_8bit=True, load_in_4bit=True, track_emissions=False)


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("option, layer", [("load_in_8bit", "Linear8bitLt"), ("load_in_4bit", "Linear4bit")])
def test_bitsandbytes_quantizes_the_linear_layers(llama_path, option, layer):
    generator = SimpleGenerator(llama_path, track_emissions=False, **{option: True})
    assert generator.model.config.quantization_config.quant_method == "bitsandbytes"
    assert any(type(m).__name__ == layer for m in generator.model.modules())
    answers = generator(PROMPTS[:4], max_new_tokens=MAX_NEW, temperature=0, show_progress_bar=False)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compile_model_keeps_greedy_answers(llama_path, caplog):
    prompts = PROMPTS[:5]
    eager = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    expected = eager(prompts, batch_size=5, max_new_tokens=MAX_NEW, temperature=0, show_progress_bar=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    caplog.set_level(logging.INFO, logger="simple_generation")
    compiled = SimpleGenerator(llama_path, device="cpu", compile_model=True, track_emissions=False)
    assert compiled.model.generation_config.cache_implementation == "static"
    answers = compiled(prompts, batch_size=5, max_new_tokens=MAX_NEW, temperature=0, show_progress_bar=False)
    assert answers == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # torch.compile really ran
    assert "compile_model: the first batch took" in caplog.text


# ------------------------------------------------------------------ attention
def test_use_bettertransformer_picks_sdpa_with_a_notice(llama_path, caplog):
    caplog.set_level(logging.INFO, logger="simple_generation")
    generator = SimpleGenerator(llama_path, device="cpu", use_bettertransformer=True, track_emissions=False)
    assert generator.model.config._attn_implementation == "sdpa"
    assert "BetterTransformer" in caplog.text and "sdpa" in caplog.text


def test_attn_implementation_passes_through(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", attn_implementation="eager", track_emissions=False)
    assert generator.model.config._attn_implementation == "eager"
    generator = SimpleGenerator(llama_path, device="cpu", attn_implementation="eager", use_bettertransformer=True,
                                track_emissions=False)
    assert generator.model.config._attn_implementation == "eager"


# ------------------------------------------------------------------ placement and dtype
def test_choose_placement():
    assert choose_placement(10 * GIB, None, []).device == "cpu"
    one = choose_placement(10 * GIB, "cuda", [40 * GIB])
    assert (one.device, one.device_map) == ("cuda:0", None) and "fits on one GPU" in one.reason
    spread = choose_placement(60 * GIB, "cuda", [40 * GIB, 40 * GIB])
    assert (spread.device, spread.device_map) == (None, "auto") and "fits across them" in spread.reason
    offload = choose_placement(60 * GIB, "cuda", [40 * GIB])
    assert offload.device_map == "auto" and "offloaded" in offload.reason
    # the headroom for activations and the KV cache counts
    assert choose_placement(39 * GIB, "cuda", [40 * GIB]).device_map == "auto"


def test_default_placement_is_logged(llama_path, caplog):
    caplog.set_level(logging.INFO, logger="simple_generation")
    generator = SimpleGenerator(llama_path, track_emissions=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert generator.model.device.type == expected
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded "))
    assert "LlamaForCausalLM" in summary and "torch.float32" in summary and expected in summary
    if expected == "cpu":
        assert "no GPU found" in summary
    assert "LoRA: none" in summary and "quantization: none" in summary and "compiled: no" in summary


def test_device_map_passes_through(llama_path, tmp_path):
    """device_map (with its companions max_memory, offload_folder) reaches from_pretrained: no room in memory
    puts every weight on disk, and the answers stay the same."""
    generator = SimpleGenerator(llama_path, device_map="auto", max_memory={"cpu": "300KB"},
                                offload_folder=str(tmp_path), track_emissions=False)
    assert set(generator.model.hf_device_map.values()) == {"disk"}
    answers = generator(PROMPTS[:3], max_new_tokens=4, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert answers == hf_greedy(llama_path, PROMPTS[:3], 4)


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_spellings(llama_path, keyword):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False, **{keyword: torch.bfloat16})
    assert generator.model.dtype == torch.bfloat16
    answers = generator(PROMPTS[:2], max_new_tokens=4, temperature=0, show_progress_bar=False)
    assert len(answers) == 2


def test_conflicting_dtypes_are_an_error(llama_path):
    with pytest.raises(ValueError, match="dtype"):
        SimpleGenerator(llama_path, dtype=torch.float32, torch_dtype=torch.bfloat16, track_emissions=False)


# ------------------------------------------------------------------ GGUF
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package (extra `gguf`)")
def test_gguf_file_loads_model_and_tokenizer(llama_path, tmp_path_factory):
    from .gguf_tiny import write_gguf

    folder = tmp_path_factory.mktemp("gguf")  # like a GGUF repo: the .gguf file and nothing else
    write_gguf(llama_path, folder / "tiny-f32.gguf")
    generator = SimpleGenerator(str(folder), gguf_file="tiny-f32.gguf", device="cpu", track_emissions=False)
    assert generator.model.dtype == torch.float32
    prompts = PROMPTS[:6]
    answers = generator(prompts, batch_size=3, max_new_tokens=MAX_NEW, temperature=0, skip_prompt=True,
                        show_progress_bar=False)
    assert answers == hf_greedy(llama_path, prompts, MAX_NEW)  # the same weights and tokenizer as the original


def test_missing_gguf_file_is_a_clear_error(llama_path):
    with pytest.raises(OSError, match="no-such.gguf"):
        SimpleGenerator(llama_path, gguf_file="no-such.gguf", track_emissions=False)


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("optimum", "gptqmodel", "auto_gptq")),
                    reason="a GPTQ library is installed")
def test_prequantized_checkpoint_without_its_library_names_the_method(llama_path, tmp_path):
    import json
    import shutil

    path = tmp_path / "gptq"
    shutil.copytree(llama_path, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportError, match="quantized with gptq"):
        SimpleGenerator(str(path), track_emissions=False)
