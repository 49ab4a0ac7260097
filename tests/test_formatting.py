"""Prompt formatting through the generator: the tokenizer's chat template, conversations, multi-turn."""

import shutil

import pytest
from transformers import AutoTokenizer

from simple_generation import SimpleGenerator

from .reference import load_reference

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_path(llama_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(llama_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_generator(chat_path):
    return SimpleGenerator(chat_path, device="cpu", apply_chat_template=True, track_emissions=False)


def _greedy_on_text(path, texts, max_new, add_special_tokens):
    model, tokenizer = load_reference(path)
    answers = []
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_chat_template_formats_like_the_tokenizer(chat_generator, chat_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_path)
    rendered = chat_generator.formatter.format(["Hi there", [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "2 + 2?"}]])
    assert rendered[0] == tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                        add_generation_prompt=True)
    assert rendered[1] == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}], tokenize=False,
        add_generation_prompt=True)
    assert rendered[1].endswith("<|assistant|>\n") and "<|system|>\nBe brief." in rendered[1]


def test_chat_template_has_exactly_one_bos(chat_generator):
    bos = chat_generator.tokenizer.bos_token_id
    prompts = chat_generator.formatter.format(["Hi there", "Tell me what is two plus two?"])
    for ids in chat_generator.formatter.tokenize(prompts):
        assert ids[0] == bos
        assert ids.count(bos) == 1


def test_plain_prompts_still_get_their_bos(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    ids = generator.formatter.tokenize(["Hi there"])[0]
    assert ids[0] == generator.tokenizer.bos_token_id and ids.count(ids[0]) == 1


def test_chat_template_answers_equal_hf_on_the_rendered_text(chat_generator, chat_path):
    conversations = [[{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]]
    answers = chat_generator(conversations, max_new_tokens=6, temperature=0, skip_prompt=True,
                             show_progress_bar=False)
    expected = _greedy_on_text(chat_path, chat_generator.formatter.format(conversations), 6,
                               add_special_tokens=False)
    assert answers == expected


def test_system_message_with_chat_template(chat_path):
    generator = SimpleGenerator(chat_path, device="cpu", apply_chat_template=True, system_message="You are a pirate.",
                                track_emissions=False)
    rendered = generator.formatter.format(["Hi"])[0]
    assert rendered.startswith(generator.tokenizer.bos_token + "<|system|>\nYou are a pirate.")


def test_apply_chat_template_without_one_raises(llama_path):
    with pytest.raises(ValueError, match="no chat template"):
        SimpleGenerator(llama_path, device="cpu", apply_chat_template=True, track_emissions=False)


def test_conversation_without_any_template_is_the_multi_turn_transcript(llama_path):
    """With neither a named nor a chat template, a conversation is the plain transcript, exactly as
    conversation_from_user_prompts formats its history (the two agree)."""
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    kwargs = dict(max_new_tokens=3, temperature=0, show_progress_bar=False)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    assert generator.formatter.format([messages]) == ["User: hi\nAssistant: hello\nUser: more\nAssistant:"]
    assert generator([messages], **kwargs) == generator(["User: hi\nAssistant: hello\nUser: more\nAssistant:"],
                                                        **kwargs)
    conversation = generator.conversation_from_user_prompts(["hi", "more"], **kwargs)
    history = conversation.messages[:3]
    assert generator([history], skip_prompt=True, **kwargs)[0].strip() == conversation.answers[-1]


@pytest.mark.parametrize("bad, match", [
    ([[{"role": "robot", "content": "x"}]], r"texts\[0\]\[0\]"),
    ([[{"role": "user"}]], r"texts\[0\]\[0\]"),
    ([[]], "empty conversation"),
])
def test_malformed_conversations(chat_generator, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        chat_generator(bad, max_new_tokens=2)


@pytest.mark.parametrize("flag", [True, False], ids=["apply_chat_template", "tokenizer-template-by-default"])
def test_multi_turn_with_chat_template_sends_whole_history(chat_path, flag):
    """With no named template, the tokenizer's chat template formats the history, flag or not."""
    generator = SimpleGenerator(chat_path, device="cpu", apply_chat_template=flag, track_emissions=False)
    user_turns = ["Hi there", "What is 2 + 2?", "Tell me a story"]
    conversation = generator.conversation_from_user_prompts(user_turns, max_new_tokens=5, temperature=0,
                                                            show_progress_bar=False)
    messages = conversation.messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert [m["content"] for m in messages[::2]] == user_turns
    tokenizer = AutoTokenizer.from_pretrained(chat_path)
    for k in range(3):
        prompt = tokenizer.apply_chat_template(messages[: 2 * k + 1], tokenize=False, add_generation_prompt=True)
        for earlier in messages[: 2 * k]:
            assert earlier["content"] in prompt
        expected = _greedy_on_text(chat_path, [prompt], 5, add_special_tokens=False)[0].strip()
        assert messages[2 * k + 1]["content"] == expected
    assert str(conversation) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_many_conversations_batched_equal_one_at_a_time(chat_generator):
    kwargs = dict(max_new_tokens=4, temperature=0, show_progress_bar=False)
    many = chat_generator.conversation_from_user_prompts([["Hi", "More"], ["One", "Two", "Three"], ["Solo"]],
                                                         **kwargs)
    assert len(many) == 3
    for conversation, turns in zip(many, [["Hi", "More"], ["One", "Two", "Three"], ["Solo"]]):
        alone = chat_generator.conversation_from_user_prompts(turns, **kwargs)
        assert conversation.messages == alone.messages


def test_original_return_flags_give_a_tuple(chat_generator):
    kwargs = dict(max_new_tokens=4, temperature=0, show_progress_bar=False)
    plain = chat_generator.conversation_from_user_prompts(["Hi", "More"], **kwargs)
    conversation, last_response = chat_generator.conversation_from_user_prompts(
        ["Hi", "More"], return_conversation=True, return_last_response=True, **kwargs)
    assert conversation.messages == plain.messages
    assert last_response == plain.answers[-1]
    (only,) = chat_generator.conversation_from_user_prompts(["Hi", "More"], return_conversation=True, **kwargs)
    assert str(only) == str(plain)
    assert chat_generator.conversation_from_user_prompts(
        ["Hi", "More"], return_conversation=False, return_last_response=True, **kwargs) == (plain.answers[-1],)


def test_multi_turn_without_template_uses_plain_transcript(llama_path):
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    conversation = generator.conversation_from_user_prompts(["Hi", "Again"], max_new_tokens=3, temperature=0,
                                                            show_progress_bar=False)
    assert str(conversation).startswith("User: Hi\nAssistant: ")
    assert len(conversation.answers) == 2


def test_chat_template_refusal_names_the_conversation(chat_path, tmp_path):
    """A template that refuses a system message (as Gemma's and Mistral's do) fails before generation."""
    path = tmp_path / "no-system"
    shutil.copytree(chat_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(path)
    generator = SimpleGenerator(str(path), device="cpu", apply_chat_template=True, track_emissions=False)
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"rejected texts\[1\]: System role not supported"):
        generator([good, bad], max_new_tokens=2)
    assert generator.last_run.prompts == 0


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_options_at_call_time(chat_path, add_generation_prompt):
    """The original API took apply_chat_template/add_generation_prompt (and num_workers) in the call."""
    generator = SimpleGenerator(chat_path, device="cpu", track_emissions=False)
    tokenizer = AutoTokenizer.from_pretrained(chat_path)
    prompts = ["Hi there", "What is 2 + 2?"]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=add_generation_prompt) for p in prompts]
    expected = _greedy_on_text(chat_path, rendered, 5, add_special_tokens=False)
    answers = generator(prompts, apply_chat_template=True, add_generation_prompt=add_generation_prompt,
                        num_workers=4, max_new_tokens=5, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert answers == expected
    plain = generator(prompts, max_new_tokens=5, temperature=0, skip_prompt=True, show_progress_bar=False)
    assert plain == _greedy_on_text(chat_path, prompts, 5, add_special_tokens=True)  # the call did not stick
    constructed = SimpleGenerator(chat_path, device="cpu", apply_chat_template=True,
                                  add_generation_prompt=add_generation_prompt, track_emissions=False)
    assert constructed(prompts, max_new_tokens=5, temperature=0, skip_prompt=True,
                       show_progress_bar=False) == expected


def test_multi_turn_answers_share_the_context(llama_path):
    """On a 256-token model with 500 new tokens asked (and EOS held off), a long first answer would leave no
    room for the later turns: each turn gets its share of the room, and every turn is answered."""
    generator = SimpleGenerator(llama_path, device="cpu", track_emissions=False)
    assert generator.context_length == 256
    turns = ["Hi", "Tell me more", "And again"]
    conversation = generator.conversation_from_user_prompts(turns, max_new_tokens=500, min_new_tokens=500,
                                                            temperature=0, show_progress_bar=False)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 3
    lengths = [len(generator.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in conversation.answers]
    assert all(n > 10 for n in lengths), lengths            # nobody was starved
    assert lengths[0] < 256 // 2, lengths                   # the first turn left room for two more answers
    assert generator.last_run.prompts == 1                  # the last turn ran (its prompt fit the context)
