"""Bad input gets a clear error before any generation starts."""

import pytest
from transformers import LogitsProcessor, LogitsProcessorList

from simple_generation import ModelLoadError, SimpleGenerator

from .reference import hf_greedy


class CountSteps(LogitsProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores


@pytest.fixture(scope="module")
def generator(llama_path):
    return SimpleGenerator(llama_path, device="cpu")


def _call(generator, texts, **kwargs):
    counter = CountSteps()
    kwargs.setdefault("max_new_tokens", 4)
    try:
        return generator(texts, show_progress_bar=False, logits_processor=LogitsProcessorList([counter]), **kwargs)
    finally:
        assert counter.calls == 0 or kwargs.get("_allow_work"), "generation ran before the error"


def test_empty_list_returns_empty(generator):
    assert generator([], max_new_tokens=4) == []
    assert generator.last_run.prompts == 0


@pytest.mark.parametrize("texts, index", [(["ok", 3], 1), ([None], 0), (["a", "b", b"bytes"], 2)])
def test_non_string_names_index(generator, texts, index):
    with pytest.raises(TypeError, match=rf"texts\[{index}\]"):
        _call(generator, texts)


def test_not_a_list(generator):
    with pytest.raises(TypeError, match="list of strings"):
        _call(generator, 42)


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="No folder"):
        SimpleGenerator(str(tmp_path / "does-not-exist"))


def test_bad_hub_id():
    with pytest.raises(ModelLoadError, match="hub id"):
        SimpleGenerator("no-such-org-xyz/no-such-model-xyz")


def test_missing_path_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        SimpleGenerator(str(tmp_path / "nope"))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -3}, "top_k"),
    ({"num_return_sequences": 0}, "num_return_sequences"),
    ({"num_beams": 0}, "num_beams"),
    ({"num_return_sequences": 3, "do_sample": False}, "num_return_sequences"),
])
def test_invalid_generation_values(generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(generator, ["hello"], **kwargs)


def test_unknown_generation_keyword(generator):
    with pytest.raises(TypeError, match="max_new_tokenz"):
        _call(generator, ["hello"], max_new_tokenz=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "big"}, "batch_size"),
    ({"batch_size": "auto", "starting_batch_size": 0}, "starting_batch_size"),
])
def test_invalid_batch_size(generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(generator, ["hello"], **kwargs)


def test_prompt_longer_than_context_raises_before_work(generator):
    too_long = "The quick brown fox jumps over the lazy dog. " * 200
    with pytest.raises(ValueError, match="context of 256 tokens.*truncate_prompts=True"):
        _call(generator, ["short one", too_long])


def test_truncate_prompts_keeps_the_end(generator, llama_path):
    tokenizer = generator.tokenizer
    tail = " Tell me what is two plus two?"
    too_long = "The quick brown fox jumps over the lazy dog." * 200 + tail
    answers = generator([too_long], truncate_prompts=True, max_new_tokens=8, temperature=0, skip_prompt=True,
                        show_progress_bar=False)
    ids = tokenizer(too_long)["input_ids"]
    kept = [ids[0]] + ids[-(256 - 8 - 1):]
    assert len(kept) + 8 <= 256
    expected = hf_greedy(llama_path, [tokenizer.decode(kept[1:])], 8)
    assert answers == expected
