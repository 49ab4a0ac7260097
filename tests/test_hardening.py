"""Issue 10, library side: stop strings, context overflow, out-of-memory wordings, input and keyword errors."""

import logging

import pytest
import torch

from simple_generation import SimpleGenerator
from simple_generation.scheduling import is_out_of_memory

from .conftest import PROMPTS
from .reference import hf_greedy, load_reference

GREEDY = {"temperature": 0, "skip_prompt": True, "show_progress_bar": False}


@pytest.fixture(scope="module")
def llama(llama_path):
    return SimpleGenerator(llama_path, device="cpu", track_emissions=False)


@pytest.fixture(scope="module")
def gpt2(gpt2_path):
    return SimpleGenerator(gpt2_path, device="cpu", track_emissions=False)


# ------------------------------------------------------------------ stop strings
@pytest.mark.parametrize("name", ["stop_strings", "stop"])
def test_user_stop_strings_work_without_a_tokenizer_argument(llama, name):
    plain = llama.generate(PROMPTS[:3], max_new_tokens=12, **GREEDY)
    # two letters from the middle of an answer (byte-level pieces may decode to U+FFFD: avoid those)
    text = plain[1].text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isalpha())
    results = llama.generate(PROMPTS[:3], max_new_tokens=12, **{name: [stop]}, **GREEDY)
    for before, after in zip(plain, results):
        if stop in before.text:
            assert after.text == before.text[: before.text.find(stop)]
            assert after.finish_reason == "stop_string"
        else:
            assert after.text == before.text
    assert results[1].completion_tokens < plain[1].completion_tokens  # generation ended, not only the text


def test_a_single_stop_string_may_be_a_str(llama):
    plain = llama(PROMPTS[1], max_new_tokens=10, **GREEDY)[0]
    stop = next(plain[i:i + 2] for i in range(1, len(plain) - 1) if plain[i:i + 2].isalpha())
    assert llama(PROMPTS[1], max_new_tokens=10, stop=stop, **GREEDY)[0] == plain[: plain.find(stop)]


@pytest.mark.parametrize("value", [[""], ["ok", ""], ""])
def test_empty_stop_string_is_rejected(llama, value):
    with pytest.raises(ValueError, match="empty stop string"):
        llama(PROMPTS[:1], max_new_tokens=2, stop_strings=value)


def test_stop_and_stop_strings_together_is_an_error(llama):
    with pytest.raises(ValueError, match="either `stop` or `stop_strings`"):
        llama(PROMPTS[:1], max_new_tokens=2, stop=["a"], stop_strings=["b"])


# ------------------------------------------------------------------ context overflow
def test_new_tokens_capped_to_the_context_on_absolute_positions(gpt2, gpt2_path, caplog):
    limit = gpt2.context_length
    prompt = "The quick brown fox jumps over the lazy dog. " * 40
    prompt_ids = gpt2.tokenizer(prompt)["input_ids"][: limit - 20]
    prompt = gpt2.tokenizer.decode(prompt_ids)
    length = len(gpt2.tokenizer(prompt)["input_ids"])
    room = limit - length
    assert 0 < room < 64
    with caplog.at_level(logging.WARNING, logger="simple_generation"):
        results = gpt2.generate([prompt, "Hi"], max_new_tokens=64, min_new_tokens=64, batch_size=2, **GREEDY)
    assert results[0].completion_tokens == room and results[0].finish_reason == "length"
    assert results[1].completion_tokens == 64
    assert gpt2.last_run.capped == 1
    assert sum("capped" in r.getMessage() for r in caplog.records) == 1
    reference = hf_greedy(gpt2_path, [prompt], room, model_and_tokenizer=load_reference(gpt2_path),
                          min_new_tokens=room)
    assert results[0].text == reference[0]


def test_huge_max_new_tokens_never_passes_the_context(llama):
    results = llama.generate(["Hi"], max_new_tokens=10**9, min_new_tokens=10**9, **GREEDY)
    prompt_tokens = results[0].prompt_tokens
    assert results[0].completion_tokens == llama.context_length - prompt_tokens
    assert results[0].finish_reason == "length"


# ------------------------------------------------------------------ out of memory
@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory."),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
])
def test_out_of_memory_wordings(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch"), ValueError("out of memory"), KeyError("x")])
def test_other_errors_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


# ------------------------------------------------------------------ input and keyword errors
def test_bytes_input_says_decode(llama):
    with pytest.raises(TypeError, match="bytes"):
        llama(b"hello")
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        llama(["ok", b"hello"])


def test_lone_surrogate_names_the_prompt(llama):
    with pytest.raises(ValueError, match=r"texts\[2\].*surrogate"):
        llama(["a", "b", "bad \ud800 text"], max_new_tokens=2)


def test_same_dtype_spelled_two_ways_is_not_a_conflict(llama_path):
    gen = SimpleGenerator(llama_path, device="cpu", dtype="float32", torch_dtype=torch.float32, track_emissions=False)
    assert gen.model.dtype == torch.float32
    with pytest.raises(ValueError, match="not both"):
        SimpleGenerator(llama_path, device="cpu", dtype="bfloat16", torch_dtype=torch.float32, track_emissions=False)
    with pytest.raises(ValueError, match="Unknown dtype"):
        SimpleGenerator(llama_path, device="cpu", dtype="float33", track_emissions=False)


def test_unknown_constructor_keyword_is_named(llama_path):
    with pytest.raises(TypeError, match="Unknown keyword argument 'devcie'.*'device'"):
        SimpleGenerator(llama_path, devcie="cpu", track_emissions=False)


def test_unknown_engine_lists_the_choices(llama_path):
    with pytest.raises(ValueError, match="static"):
        SimpleGenerator(llama_path, device="cpu", engine="turbo", track_emissions=False)
