"""Batching, padding and sorting never change an answer: equal to HF's unbatched generate (fp32)."""

import pytest

from simple_generation import SimpleGenerator

from .conftest import PROMPTS
from .reference import hf_greedy

MAX_NEW = 12


@pytest.fixture(scope="module", params=["llama", "gpt2", "t5", "bart"])
def arch_case(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    generator = SimpleGenerator(path, device="cpu")
    expected = hf_greedy(path, PROMPTS, MAX_NEW)
    return request.param, generator, expected


# The quick tier keeps one case per architecture (sorted batches of 3); the whole grid is slow.
@pytest.mark.parametrize("sort, batch_size", [
    pytest.param(sort, batch_size, id=f"{sort}-{batch_size}",
                 marks=() if (sort, batch_size) == (True, 3) else pytest.mark.slow)
    for sort in (True, False) for batch_size in (1, 3, 8, "auto")
])
def test_batched_greedy_equals_unbatched_hf(arch_case, batch_size, sort):
    arch, generator, expected = arch_case
    answers = generator(
        PROMPTS, batch_size=batch_size, sort_prompts_by_length=sort, max_new_tokens=MAX_NEW,
        do_sample=False, skip_prompt=True, show_progress_bar=False,
    )
    assert answers == expected, arch


def test_temperature_zero_is_greedy(arch_case):
    _, generator, expected = arch_case
    answers = generator(PROMPTS, batch_size=4, max_new_tokens=MAX_NEW, temperature=0, skip_prompt=True,
                        show_progress_bar=False)
    assert answers == expected


def test_skip_prompt_false_keeps_prompt_for_causal(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu")
    prompts = PROMPTS[:5]
    full = generator(prompts, max_new_tokens=6, temperature=0, show_progress_bar=False)
    continuation = generator(prompts, max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
    for prompt, whole, cont in zip(prompts, full, continuation, strict=True):
        assert whole.startswith(prompt.strip()[:1])
        assert whole.endswith(cont)
        assert len(whole) > len(cont)


def test_seq2seq_never_echoes_prompt(t5_path):
    generator = SimpleGenerator(t5_path, device="cpu")
    with_prompt = generator(PROMPTS[:4], max_new_tokens=6, temperature=0, show_progress_bar=False)
    without = generator(PROMPTS[:4], max_new_tokens=6, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert with_prompt == without


def test_num_return_sequences_groups_answers_per_prompt(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu")
    answers = generator(PROMPTS[:5], num_return_sequences=3, max_new_tokens=5, batch_size=2, skip_prompt=True,
                        show_progress_bar=False)
    assert len(answers) == 5
    assert all(isinstance(a, list) and len(a) == 3 and all(isinstance(x, str) for x in a) for a in answers)


@pytest.mark.parametrize("batch_size", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_beam_search_matches_hf(llama_path, batch_size):
    generator = SimpleGenerator(llama_path, device="cpu")
    expected = hf_greedy(llama_path, PROMPTS[:6], 8, num_beams=3)
    answers = generator(PROMPTS[:6], num_beams=3, do_sample=False, max_new_tokens=8, batch_size=batch_size,
                        skip_prompt=True, show_progress_bar=False)
    assert answers == expected


def test_single_string_input_returns_list(gpt2_path):
    generator = SimpleGenerator(gpt2_path, device="cpu")
    answers = generator("Hello", max_new_tokens=4, temperature=0, show_progress_bar=False)
    assert isinstance(answers, list) and len(answers) == 1


@pytest.mark.slow
def test_pad_token_outside_the_embeddings_falls_back_to_eos(llama_path, tmp_path, caplog):
    """A tokenizer whose pad token was added without resizing the model must not crash padded batches."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "added-pad"
    shutil.copytree(llama_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "<new-pad>"})
    tokenizer.save_pretrained(folder)
    with caplog.at_level("WARNING", logger="simple_generation"):
        generator = SimpleGenerator(str(folder), device="cpu")
    assert generator.tokenizer.pad_token_id == generator.tokenizer.eos_token_id
    assert "outside the model's" in caplog.text
    answers = generator(PROMPTS, batch_size=4, max_new_tokens=MAX_NEW, temperature=0, skip_prompt=True,
                        show_progress_bar=False)
    assert answers == hf_greedy(llama_path, PROMPTS, MAX_NEW)


def test_empty_prompt_starts_from_bos_like_hf(gpt2_path):
    """GPT-2's tokenizer gives no token for "": like ``model.generate()`` without inputs, start from BOS."""
    import torch

    from .reference import load_reference

    model, tokenizer = load_reference(gpt2_path)
    reference = model.generate(max_new_tokens=MAX_NEW, do_sample=False)
    assert tokenizer("")["input_ids"] == []
    expected = tokenizer.decode(reference[0], skip_special_tokens=True)
    generator = SimpleGenerator(gpt2_path, device="cpu")
    answers = generator(["", PROMPTS[1], ""], batch_size=3, max_new_tokens=MAX_NEW, temperature=0,
                        show_progress_bar=False)
    assert answers[0] == answers[2] == expected
    assert answers[1] == PROMPTS[1] + hf_greedy(gpt2_path, [PROMPTS[1]], MAX_NEW, (model, tokenizer))[0]
    assert torch.equal(reference[0, :1], torch.tensor([tokenizer.bos_token_id]))
