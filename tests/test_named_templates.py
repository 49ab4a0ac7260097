"""Named templates through the generator: prompt text, answers, stop strings and ids, multi-turn, errors."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from simple_generation import SimpleGenerator, render_conversation
from simple_generation.templates import Template, get_template

from .reference import load_reference

PIRATE = "You are a pirate."


@pytest.fixture(scope="module")
def vicuna(llama_path):
    return SimpleGenerator(llama_path, device="cpu", system_prompt="vicuna_v1.1", system_message=PIRATE,
                           track_emissions=False)


def _cut(text, stops):
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _greedy(path, texts, max_new, stops=()):
    model, tokenizer = load_reference(path)
    answers = []
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        answers.append(_cut(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), stops))
    return answers


def test_each_prompt_is_one_user_turn_as_fastchat_renders_it(vicuna):
    prompts = ["Hi", "Tell me what is two plus two?"]
    expected = [render_conversation("vicuna_v1.1", [{"role": "user", "content": p}], PIRATE) for p in prompts]
    assert vicuna.formatter.format(prompts) == expected
    assert expected[0].startswith(PIRATE + " USER: Hi ASSISTANT:")


def test_answers_equal_greedy_on_the_rendered_prompt(vicuna, llama_path):
    prompts = ["Hi", "Tell me what is two plus two?", "Once upon a time"]
    answers = vicuna(prompts, batch_size=2, max_new_tokens=6, temperature=0, skip_prompt=True,
                     show_progress_bar=False)
    expected = _greedy(llama_path, vicuna.formatter.format(prompts), 6, get_template("vicuna_v1.1").stop_strings)
    assert answers == expected


def test_original_spelling_system_prompts(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", system_prompts="llama-2", track_emissions=False)
    assert generator.formatter.format(["Hi"]) == [render_conversation("llama-2", [{"role": "user", "content": "Hi"}])]


def test_unknown_template_fails_before_loading_with_suggestions(tmp_path):
    # the model path does not exist: the template error coming first shows nothing was loaded
    with pytest.raises(ValueError, match="'vicuna_v1.1'"):
        SimpleGenerator(str(tmp_path / "no-model"), system_prompt="vicuna-v1.1", track_emissions=False)


class ForceTokens(LogitsProcessor):
    """Makes the model write ``tokens`` first, whatever it would say."""

    def __init__(self, prompt_length, tokens):
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.tokens):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.tokens[step]] = 0
        return scores


def _forced(generator, prompt, text):
    length = len(generator.formatter.tokenize(generator.formatter.format([prompt]))[0])
    tokens = generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    return LogitsProcessorList([ForceTokens(length, tokens)])


def test_stop_string_ends_the_answer_and_is_not_returned(vicuna):
    forced = " Arr, four. USER: and now?"
    answer = vicuna("Hi", max_new_tokens=30, temperature=0, skip_prompt=True, show_progress_bar=False,
                    logits_processor=_forced(vicuna, "Hi", forced))[0]
    assert answer == " Arr, four. "
    assert vicuna.last_run.generated_tokens < 30  # generation stopped at the marker, not only the text
    whole = vicuna("Hi", max_new_tokens=30, temperature=0, show_progress_bar=False,
                   logits_processor=_forced(vicuna, "Hi", forced))[0]
    assert whole.endswith("ASSISTANT: Arr, four. ") and "and now" not in whole


def test_stop_token_ids_end_the_answer(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    words = generator.tokenizer(" one two three four five", add_special_tokens=False)["input_ids"]
    stop_id = words[2]
    template = Template(name="custom", system_message="", roles=("Q", "A"), sep_style="ADD_COLON_SINGLE", sep="\n",
                        stop_token_ids_=(stop_id,))
    generator = SimpleGenerator(llama_path, device="cpu", system_prompt=template, track_emissions=False)
    answer = generator("Hi", max_new_tokens=20, temperature=0, skip_prompt=True, show_progress_bar=False,
                       logits_processor=_forced(generator, "Hi", " one two three four five"))[0]
    assert answer == generator.tokenizer.decode(words[:2])
    assert generator.last_run.generated_tokens == 3  # two words and the stop token


def test_multi_turn_with_named_template(vicuna, llama_path):
    user_turns = ["Hi there", "What is 2 + 2?", "Tell me a story"]
    conversation = vicuna.conversation_from_user_prompts(user_turns, max_new_tokens=5, temperature=0,
                                                         show_progress_bar=False)
    messages = conversation.messages
    assert [m["content"] for m in messages[::2]] == user_turns
    for k in range(3):
        prompt = render_conversation("vicuna_v1.1", messages[: 2 * k + 1], PIRATE)
        for earlier in messages[: 2 * k]:
            assert earlier["content"] in prompt
        expected = _greedy(llama_path, [prompt], 5, get_template("vicuna_v1.1").stop_strings)[0].strip()
        assert messages[2 * k + 1]["content"] == expected
    assert str(conversation) == render_conversation("vicuna_v1.1", messages, PIRATE)
    assert str(conversation).startswith(PIRATE + " USER: Hi there ASSISTANT:")
