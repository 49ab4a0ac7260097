"""Reasoning models: the ``<think>...</think>`` block of an answer goes to ``reasoning``, the text keeps the answer.

A tiny real Qwen3-style checkpoint is built here: the tiny llama's byte-level BPE tokenizer with ``<|im_start|>``,
``<|im_end|>``, ``<think>`` and ``</think>`` added (as special tokens, or as plain added tokens the way Qwen3 has
them), a chat template that opens ``<think>\\n`` in the generation prompt (as Qwen3-Thinking's and DeepSeek-R1's
do), and a random Qwen3 model over that vocabulary. Answers are forced with a real ``LogitsProcessor`` passed to
``generate``; nothing is mocked.
"""

import json

import pytest
import torch
from transformers import AddedToken, AutoTokenizer, LogitsProcessor, LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

from simple_generation import SimpleGenerator
from simple_generation.io import InputRecord, output_record
from simple_generation.io.writers import openai_batch_line
from simple_generation.postprocess import detect_reasoning_markers, resolve_reasoning_markers, split_reasoning
from simple_generation.results import CompletionOutput, GenerationResult

MARKERS = ("<think>", "</think>")
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
PLAIN_TEMPLATE = (  # no reasoning opened by the template (the model may still open its own block)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_reasoning_checkpoint(llama_path, into, *, special: bool, template: str = THINKING_TEMPLATE,
                               hidden: int = 64, heads: int = 4) -> str:
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken(m, special=special, normalized=False) for m in MARKERS],
                         special_tokens=special)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=hidden // heads, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, initializer_range=0.2)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    return str(into)


@pytest.fixture(scope="module", params=["special", "added"])
def reasoning_path(request, llama_path, tmp_path_factory):
    special = request.param == "special"
    return build_reasoning_checkpoint(llama_path, tmp_path_factory.mktemp(f"qwen3-{request.param}"), special=special)


@pytest.fixture(scope="module")
def reasoning_gen(reasoning_path):
    return SimpleGenerator(reasoning_path, apply_chat_template=True, track_emissions=False)


class ForceTokens(LogitsProcessor):
    """Makes every row generate ``script`` (then EOS forever): a fresh one per call, whose rows share one batch."""

    def __init__(self, script: list[int], eos: int):
        self.script, self.eos, self.start = script, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        token = self.script[step] if step < len(self.script) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


def script_of(tokenizer, *pieces: str) -> list[int]:
    ids: list[int] = []
    for piece in pieces:
        if piece in MARKERS or piece == "<|im_end|>":
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def forced(gen, *pieces: str) -> LogitsProcessorList:
    tokenizer = gen.tokenizer
    return LogitsProcessorList([ForceTokens(script_of(tokenizer, *pieces), tokenizer.eos_token_id)])


def call(gen, prompts, *pieces, **kwargs):
    return gen.generate(prompts, logits_processor=forced(gen, *pieces), skip_prompt=True, show_progress_bar=False,
                        batch_size=16, **kwargs)


# ------------------------------------------------------------------------------------------ the split itself
@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nadd 2 and 2\n</think>\n\nFour.", False, ("add 2 and 2", "Four.")),
    ("add 2 and 2\n</think>\n\nFour.", True, ("add 2 and 2", "Four.")),         # the template opened the block
    ("add 2 and 2</think>Four.", False, ("add 2 and 2", "Four.")),              # opening not visible in the text
    ("<think>\nadd 2 and", False, ("add 2 and", "")),                           # cut inside the thinking
    ("add 2 and", True, ("add 2 and", "")),
    ("", True, ("", "")),
    ("Four.", False, (None, "Four.")),                                          # no block: unchanged
    ("\n\nFour. <think> is a tag", False, (None, "\n\nFour. <think> is a tag")),
    ("Well: <think>x</think> Four.", False, ("x", "Well:  Four.")),
])
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, MARKERS, opened) == expected


def test_markers_resolve_and_detect(llama_path, reasoning_path):
    plain = AutoTokenizer.from_pretrained(llama_path)
    thinking = AutoTokenizer.from_pretrained(reasoning_path)
    assert detect_reasoning_markers(plain) is None
    assert detect_reasoning_markers(thinking) == MARKERS
    plain.chat_template = THINKING_TEMPLATE  # a template that writes <think> is enough
    assert detect_reasoning_markers(plain) == MARKERS
    assert resolve_reasoning_markers(None, thinking) is None
    assert resolve_reasoning_markers(["<r>", "</r>"], thinking) == ("<r>", "</r>")
    for bad in ("yes", ("<r>",), ("<r>", "<r>"), ("<r>", "")):
        with pytest.raises(ValueError, match="reasoning_markers"):
            resolve_reasoning_markers(bad, thinking)


# ------------------------------------------------------------------------------------------ end to end
def test_reasoning_is_split_from_the_answer(reasoning_gen):
    gen = reasoning_gen
    assert gen.reasoning_markers == MARKERS
    pieces = ("two plus two", "\n", "</think>", "\n\n", "Two plus two is four.", "<|im_end|>")
    results = call(gen, ["What is 2 + 2?", "And 3 + 3?"], *pieces, max_new_tokens=64)
    for result in results:
        assert result.reasoning == "two plus two"
        assert result.text == "Two plus two is four."
        assert result.outputs[0].reasoning == "two plus two"
        assert result.finish_reason == "stop"
        # max_new_tokens counts both: every generated token, reasoning included
        assert result.completion_tokens == len(result.token_ids[0]) == len(script_of(gen.tokenizer, *pieces))


def test_an_answer_cut_inside_its_thinking_is_all_reasoning(reasoning_gen):
    gen = reasoning_gen
    [result] = call(gen, ["What is 2 + 2?"], "two plus two is four and", "</think>", "Four.", max_new_tokens=3)
    assert result.finish_reason == "length"
    assert result.text == ""
    assert result.reasoning == gen.tokenizer.decode(result.token_ids[0], skip_special_tokens=True).strip("\n")
    assert result.reasoning


def test_no_block_leaves_the_text_as_it_is(reasoning_path, tmp_path):
    path = build_reasoning_checkpoint(reasoning_path, tmp_path / "plain-template", special=True,
                                      template=PLAIN_TEMPLATE)
    gen = SimpleGenerator(path, apply_chat_template=True, track_emissions=False)
    assert gen.reasoning_markers == MARKERS  # from the vocabulary: the template does not mention <think>
    [result] = call(gen, ["What is 2 + 2?"], "Four.", "<|im_end|>", max_new_tokens=16)
    [off] = call(gen, ["What is 2 + 2?"], "Four.", "<|im_end|>", max_new_tokens=16, reasoning_markers=None)
    assert result.reasoning is None and result.text == off.text == "Four."
    # the model opening its own block (the template did not): split as well
    [own] = call(gen, ["What is 2 + 2?"], "<think>", "hmm", "</think>", "Four.", "<|im_end|>", max_new_tokens=16)
    assert (own.reasoning, own.text) == ("hmm", "Four.")


def test_the_store_keeps_the_raw_text_so_markers_can_change_without_regenerating(reasoning_gen, tmp_path):
    gen = reasoning_gen
    store = tmp_path / "run.sqlite"
    pieces = ("two plus two", "</think>", "\n\n", "Four.", "<|im_end|>")
    [first] = call(gen, ["What is 2 + 2?"], *pieces, max_new_tokens=32, store=store)
    [raw] = call(gen, ["What is 2 + 2?"], *pieces, max_new_tokens=32, store=store, reasoning_markers=None)
    [again] = call(gen, ["What is 2 + 2?"], *pieces, max_new_tokens=32, store=store)
    assert not first.cached and raw.cached and again.cached
    assert (first.reasoning, first.text) == (again.reasoning, again.text) == ("two plus two", "Four.")
    assert raw.reasoning is None and raw.text == "two plus two</think>\n\nFour."


def test_echoed_prompt_is_followed_by_the_answer_only(reasoning_gen):
    gen = reasoning_gen
    [result] = gen.generate(["What is 2 + 2?"], logits_processor=forced(gen, "two plus two", "</think>", "Four.",
                                                                         "<|im_end|>"), skip_prompt=False,
                            max_new_tokens=16, show_progress_bar=False)
    assert result.reasoning == "two plus two"
    assert result.text.endswith("assistant\n<think>\nFour.")


def test_a_call_may_turn_it_off_or_use_other_markers(reasoning_gen):
    gen = reasoning_gen
    [result] = call(gen, ["Hi"], "<r>", "hmm", "</r>", "Hello.", "<|im_end|>", max_new_tokens=32,
                    reasoning_markers=("<r>", "</r>"))
    assert (result.reasoning, result.text) == ("hmm", "Hello.")


def test_models_without_markers_are_untouched(llama_path):
    gen = SimpleGenerator(llama_path, track_emissions=False)
    assert gen.reasoning_markers is None
    [result] = gen.generate(["Hello"], max_new_tokens=4, show_progress_bar=False)
    assert result.reasoning is None


def test_the_continuous_engine_splits_as_the_static_one(reasoning_path):
    # no forcing (the continuous engine takes no logits processors): the random model never closes the block the
    # template opened, so each answer is all reasoning, equal on both engines
    answers = {}
    for engine in ("static", "continuous"):
        gen = SimpleGenerator(reasoning_path, apply_chat_template=True, track_emissions=False, engine=engine)
        results = gen.generate(["What is 2 + 2?", "Tell me a story"], max_new_tokens=6, skip_prompt=True,
                               do_sample=False, show_progress_bar=False)
        answers[engine] = [(r.reasoning, r.text, r.finish_reason) for r in results]
    assert answers["static"] == answers["continuous"]
    assert all(text == "" and reasoning is not None for reasoning, text, _ in answers["static"])


# ------------------------------------------------------------------------------------------ records
def test_output_records_hold_reasoning_only_when_the_run_uses_it():
    record = InputRecord(index=0, prompt="Hi", fields={"reasoning": "an input field"})
    result = GenerationResult(index=0, outputs=[CompletionOutput(0, "Four.", [1], "stop", reasoning="2 + 2")])
    plain = output_record(record, result)  # a run without reasoning: the input's own field, carried as it is
    assert plain["reasoning"] == "an input field" and "input_reasoning" not in plain
    with_reasoning = output_record(record, result, reasoning=True)
    assert with_reasoning["reasoning"] == "2 + 2" and with_reasoning["input_reasoning"] == "an input field"
    assert list(with_reasoning).index("reasoning") == list(with_reasoning).index("answer") + 1
    failed = output_record(record, {"error": "boom"}, reasoning=True)
    assert failed["reasoning"] is None
    many = GenerationResult(index=0, outputs=[CompletionOutput(0, "a", reasoning="x"), CompletionOutput(1, "b")])
    assert output_record(record, many, reasoning=True)["reasoning"] == ["x", None]
    line = openai_batch_line(with_reasoning)
    assert line["response"]["body"]["choices"][0]["message"]["reasoning_content"] == "2 + 2"
    assert "reasoning_content" not in openai_batch_line(plain | {"reasoning": None})["response"]["body"][
        "choices"][0]["message"]


def test_a_job_writes_reasoning_for_reasoning_models_only(reasoning_gen, llama_path, tmp_path):
    from simple_generation.io import OrderedWriter
    from simple_generation.io.sources import ListSource
    from simple_generation.jobs import JobOptions, run_job

    def job(gen, name, **generation):
        out = tmp_path / name
        with OrderedWriter(out) as writer:
            run_job(gen, ListSource(["What is 2 + 2?"]), writer,
                    JobOptions(generation={"max_new_tokens": 4, "temperature": 0, **generation}, skip_prompt=True,
                               show_progress=False))
        return [json.loads(line) for line in out.read_text().splitlines()]

    [thinking] = job(reasoning_gen, "thinking.jsonl")
    assert "reasoning" in thinking and thinking["answer"] == "" and thinking["finish_reason"] == "length"
    [off] = job(reasoning_gen, "off.jsonl", reasoning_markers=None)
    assert "reasoning" not in off and off["answer"].strip("\n") == thinking["reasoning"]
    [plain] = job(SimpleGenerator(llama_path, track_emissions=False), "plain.jsonl")
    assert "reasoning" not in plain


def test_cli_writes_reasoning_and_can_turn_it_off(reasoning_path, tmp_path):
    from simple_generation.cli import main

    fast = ["--prompt", "What is 2 + 2?", "--chat-template", "--max-new-tokens", "4", "--quiet", "--no-emissions",
            "--no-store"]
    out, off = tmp_path / "out.jsonl", tmp_path / "off.jsonl"
    assert main([reasoning_path, *fast, "--output", str(out)]) == 0
    assert main([reasoning_path, *fast, "--output", str(off), "--reasoning-markers", "none"]) == 0
    record, plain = (json.loads(path.read_text()) for path in (out, off))
    assert record["answer"] == "" and record["reasoning"] and record["finish_reason"] == "length"
    assert "reasoning" not in plain and plain["answer"].strip("\n") == record["reasoning"]
    assert main([reasoning_path, *fast, "--reasoning-markers", "a", "b", "c"]) == 2  # a usage error
