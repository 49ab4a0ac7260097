"""pipeline.plan_call on its own: validation, keys, dedup, copies, context room and store lookup, before any
generation. A tiny real tokenizer and generation config (tests/conftest.py); no model runs here."""

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer, GenerationConfig

from simple_generation.config import DefaultGenerationConfig
from simple_generation.engines.router import EngineRouter
from simple_generation.formatting import PromptFormatter
from simple_generation.params import ParamsBuilder
from simple_generation.pipeline import CallPlan, plan_call
from simple_generation.postprocess import PostProcessor
from simple_generation.store import ResultStore, StoredAnswer

from .engine_helpers import EchoEngine

GREEDY = {"do_sample": False, "max_new_tokens": 8}
SAMPLED = {"do_sample": True, "temperature": 0.8, "max_new_tokens": 8}
IDENTITY = '{"model": "tiny-llama"}'


@pytest.fixture(scope="module")
def tiny(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    return SimpleNamespace(tokenizer=tokenizer, generation_config=GenerationConfig.from_pretrained(llama_path))


def plan(tiny, inputs, *, generation=None, template=None, identity=IDENTITY, engine_calls=None, **options
         ) -> CallPlan:
    """plan_call as SimpleGenerator.stream calls it, with the options these tests vary (the one place that knows
    plan_call's keywords). ``engine_calls`` collects the engine chooser's arguments."""
    tokenizer = tiny.tokenizer
    formatter = PromptFormatter(tokenizer, template=template)
    builder = ParamsBuilder(tiny.generation_config, DefaultGenerationConfig(), tokenizer.pad_token_id, tokenizer,
                            formatter.stop_strings, formatter.stop_token_ids)

    class Router(EngineRouter):  # the router of one small real engine, recording what it is asked
        def choose(self, distinct, job):
            if engine_calls is not None:
                engine_calls.append((distinct, job))
            return super().choose(distinct, job)

    def start_empty(token_ids):  # an empty prompt starts from BOS, as the generator's does
        return [ids or [tokenizer.bos_token_id] for ids in token_ids]

    arguments = dict(generation_kwargs=dict(GREEDY if generation is None else generation), params=None,
                     context_length=256, is_encoder_decoder=False, truncate=False, on_error="raise", dedup=True,
                     near_duplicates=None, store=None, skip_prompt=True)
    arguments.update(options)
    return plan_call(inputs, formatter=formatter, builder=builder, start_empty=start_empty,
                     router=Router.for_engine(EchoEngine()), model_identity=lambda family: identity,
                     postprocessor=PostProcessor(tokenizer, False, formatter.stop_token_ids), **arguments)


def keys(call_plan: CallPlan) -> list[str]:
    return [slot.request.key for slot in call_plan.slots]


def new_tokens(request) -> int:
    return request.max_new_tokens


# ------------------------------------------------------------------ bad input, named
def test_lone_surrogate_raises_naming_the_prompt(tiny):
    with pytest.raises(ValueError, match=r"texts\[1\] holds a character that is not valid Unicode"):
        plan(tiny, ["fine", "cut emoji \ud83d", "also fine"])


def test_lone_surrogate_in_a_message_is_named_too(tiny):
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        plan(tiny, [[{"role": "user", "content": "bad \udfff"}]], template="vicuna_v1.1")


def test_lone_surrogate_is_recorded_and_the_rest_planned(tiny):
    result = plan(tiny, ["fine", "cut emoji \ud83d", "also fine"], on_error="record")
    assert [(r.index, r.ok) for r in result.ready] == [(1, False)]
    assert "lone surrogate" in result.ready[0].error and result.ready[0].outputs == []
    assert [slot.positions for slot in result.slots] == [[0], [2]]
    assert result.isolate_errors


def test_unknown_on_error_is_refused(tiny):
    with pytest.raises(ValueError, match='on_error must be "raise" or "record"'):
        plan(tiny, ["a"], on_error="ignore")


@pytest.mark.parametrize("params, got", [([{}], "got 1"), ([{}, None, {}], "got 3"), ({"temperature": 1}, "got dict")])
def test_params_must_have_one_entry_per_prompt(tiny, params, got):
    with pytest.raises(ValueError, match=rf"params must be a list with one dict \(or None\) per prompt: 2 prompts, "
                                         rf"{got}"):
        plan(tiny, ["a", "b"], params=params)


def test_a_params_entry_that_is_not_a_dict_is_named(tiny):
    with pytest.raises(ValueError, match=r"params\[1\] must be a dict.* or None, got str"):
        plan(tiny, ["a", "b"], params=[None, "hot"])


# ------------------------------------------------------------------ dedup and copies
def test_identical_prompts_share_one_slot_with_both_positions(tiny):
    result = plan(tiny, ["same", "other", "same"])
    assert [slot.positions for slot in result.slots] == [[0, 2], [1]]
    assert result.stats.deduplicated == 1 and result.stats.prompts == 3
    assert [slot.request.id for slot in result.slots] == [0, 1]


def test_without_dedup_identical_prompts_get_their_own_slot_and_the_same_key(tiny):
    result = plan(tiny, ["same", "same"], dedup=False)
    assert [slot.positions for slot in result.slots] == [[0], [1]]
    assert len(set(keys(result))) == 1 and result.stats.deduplicated == 0


def test_identical_prompts_with_different_parameters_are_not_merged(tiny):
    result = plan(tiny, ["same", "same"], params=[None, {"max_new_tokens": 3}])
    assert [slot.positions for slot in result.slots] == [[0], [1]]
    assert len(set(keys(result))) == 2


def test_sampled_copies_get_distinct_keys_and_seeds(tiny):
    result = plan(tiny, ["same", "same", "same"], generation={**SAMPLED, "seed": 7})
    assert [slot.positions for slot in result.slots] == [[0], [1], [2]]
    assert len(set(keys(result))) == 3
    seeds = [slot.request.seed for slot in result.slots]
    assert seeds[0] == 7 and len(set(seeds)) == 3  # the first copy keeps the call's seed
    again = plan(tiny, ["same", "same", "same"], generation={**SAMPLED, "seed": 7})
    assert keys(again) == keys(result) and [slot.request.seed for slot in again.slots] == seeds


def test_sampled_copies_without_a_seed_still_get_distinct_keys(tiny):
    result = plan(tiny, ["same", "same"], generation=SAMPLED)
    assert len(set(keys(result))) == 2 and all(slot.request.seed is None for slot in result.slots)


def test_near_duplicates_are_ready_and_not_planned(tiny):
    pytest.importorskip("datasketch")
    text = "Write a poem in the style of Leonardo da Vinci about the sea, the sky and the mountains at dawn."
    result = plan(tiny, [text, "What is two plus two?", text.replace("dawn.", "dawn!")], near_duplicates=0.8)
    assert [(r.index, r.duplicate_of, r.answer) for r in result.ready] == [(2, 0, None)]
    assert [slot.positions for slot in result.slots] == [[0], [1]]
    assert result.stats.near_duplicates == 1


# ------------------------------------------------------------------ context room
def test_too_long_prompt_fails_naming_it(tiny):
    long = "The quick brown fox jumps over the lazy dog. " * 5
    length = len(tiny.tokenizer(long).input_ids)
    with pytest.raises(ValueError, match=rf"1 prompt\(s\) leave no room in the model's context of 32 tokens "
                                         rf"\(prompt 1 has {length} tokens\).*truncate_prompts=True"):
        plan(tiny, ["short", long], context_length=32)


def test_a_huge_prompt_is_found_too_long_from_a_piece(tiny):
    huge = "The quick brown fox jumps over the lazy dog. " * 200  # more than 16 characters per context token
    with pytest.raises(ValueError, match=r"prompt 0 has at least \d+ tokens"):
        plan(tiny, [huge], context_length=32)


def test_too_long_prompt_is_recorded_with_its_length(tiny):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    result = plan(tiny, ["short", long], context_length=32, on_error="record")
    (failed,) = result.ready
    assert failed.index == 1 and "more than the model's context of 32" in failed.error
    assert failed.prompt_tokens > 32
    assert [slot.positions for slot in result.slots] == [[0]]


def test_truncation_keeps_bos_and_the_end_leaving_room_for_the_answer(tiny):
    long = "The quick brown fox jumps over the lazy dog. " * 20 + "Tell me what is two plus two?"
    whole = tiny.tokenizer(long).input_ids
    result = plan(tiny, [long], context_length=32, truncate=True)
    (slot,) = result.slots
    ids = slot.request.token_ids
    assert ids[0] == tiny.tokenizer.bos_token_id and len(ids) == 32 - GREEDY["max_new_tokens"]
    assert ids[1:] == whole[len(whole) - len(ids) + 1:]
    assert new_tokens(slot.request) == GREEDY["max_new_tokens"] and result.prompt_ids[0] == ids
    untruncated = plan(tiny, [long], context_length=4096)
    assert keys(result) != keys(untruncated)  # not the same prompt, not the same answer


def test_new_tokens_are_capped_to_the_room_left(tiny):
    prompt = "Tell me what is two plus two? " * 3
    length = len(tiny.tokenizer(prompt).input_ids)
    assert length > 12
    result = plan(tiny, [prompt, "Hi"], context_length=length + 3, generation={**GREEDY, "max_new_tokens": 10})
    assert [new_tokens(slot.request) for slot in result.slots] == [3, 10]
    assert result.stats.capped == 1
    uncapped = plan(tiny, [prompt], context_length=4096, generation={**GREEDY, "max_new_tokens": 10})
    assert keys(uncapped)[0] == keys(result)[0]  # the key holds what was asked; the cap follows from the model


def test_empty_prompt_starts_from_bos(tiny):
    result = plan(tiny, [""])
    assert result.slots[0].request.token_ids == [tiny.tokenizer.bos_token_id]


# ------------------------------------------------------------------ store lookup
def test_stored_answers_are_ready_as_cached_results(tiny, tmp_path):
    first = plan(tiny, ["one", "two", "one"])
    key_one = first.slots[0].request.key
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put(StoredAnswer(key_one, [" uno"], [[5, 6]], ["stop"], 3, 2), IDENTITY, "one", "{}")
        store.put(StoredAnswer(keys(first)[1], [], [], [], 3, 0, "out of memory"), IDENTITY, "two", "{}")
        second = plan(tiny, ["one", "two", "one"], store=store)
    assert [(r.index, r.cached, r.text, r.token_ids, r.finish_reason) for r in second.ready] == [
        (0, True, " uno", [[5, 6]], "stop"), (2, True, " uno", [[5, 6]], "stop")]
    assert second.ready[0].outputs[0].index == 0 and second.ready[0].completion_tokens == 2
    assert [slot.positions for slot in second.slots] == [[1]]  # the failed answer is generated again
    assert second.stats.cached == 2


def test_a_store_of_another_model_serves_nothing(tiny, tmp_path):
    first = plan(tiny, ["one"])
    with ResultStore(tmp_path / "run.sqlite") as store:
        store.put(StoredAnswer(keys(first)[0], [" uno"], [[5]], ["stop"], 3, 1), IDENTITY, "one", "{}")
        other = plan(tiny, ["one"], store=store, identity='{"model": "another"}')
    assert other.ready == [] and len(other.slots) == 1


# ------------------------------------------------------------------ keys name what decides the answer
def test_keys_are_equal_when_nothing_answer_relevant_differs(tiny):
    base = plan(tiny, ["a question"])
    assert keys(plan(tiny, ["a question"])) == keys(base)
    assert keys(plan(tiny, ["first", "a question"]))[1] == keys(base)[0]  # not its position or neighbours
    assert keys(plan(tiny, ["a question"], skip_prompt=False, dedup=False)) == keys(base)
    assert keys(plan(tiny, ["a question"], params=[{"max_new_tokens": GREEDY["max_new_tokens"]}])) == keys(base)


@pytest.mark.parametrize("change", [
    {"inputs": ["another question"]},
    {"template": "vicuna_v1.1"},
    {"generation": {**GREEDY, "max_new_tokens": 9}},
    {"generation": {**GREEDY, "repetition_penalty": 1.3}},
    {"generation": {**GREEDY, "stop": ["."]}},
    {"generation": SAMPLED},
    {"params": [{"temperature": 0.5}]},
    {"identity": '{"model": "another"}'},
])
def test_keys_differ_when_the_answer_may_differ(tiny, change):
    change = dict(change)
    inputs = change.pop("inputs", ["a question"])
    assert keys(plan(tiny, inputs, **change)) != keys(plan(tiny, ["a question"]))


def test_sampled_keys_depend_on_the_seed(tiny):
    assert keys(plan(tiny, ["q"], generation={**SAMPLED, "seed": 1})) != \
        keys(plan(tiny, ["q"], generation={**SAMPLED, "seed": 2}))


# ------------------------------------------------------------------ the engine is chosen from the whole call
def test_engine_chooser_sees_the_distinct_parameters_and_the_job(tiny):
    calls = []
    result = plan(tiny, ["a", "b", "c"], params=[None, None, {"max_new_tokens": 2}], engine_calls=calls)
    ((distinct, job),) = calls
    assert len(distinct) == 2 and job.requests == 3 and job.greedy
    assert job.new_tokens == 8 + 8 + 2
    assert (result.engine.name, result.engine_reason, result.model_identity) == ("echo", "requested", IDENTITY)
