"""The engine router: which engine runs a call, falling back along the order, and when a fast engine starts.

Small real engines without a model (tests/engine_helpers.py) stand in for the HF engines and for vLLM/OpenVINO,
which live in their own environments; the planning tests use a tiny real tokenizer and a real store.
"""

import logging

import pytest
from transformers import AutoTokenizer, GenerationConfig

from simple_generation.config import DefaultGenerationConfig
from simple_generation.engines import REGISTRY
from simple_generation.engines.base import EngineContext
from simple_generation.engines.fast import FastEngines
from simple_generation.engines.router import EngineRouter, engine_order, family_of, requested_class
from simple_generation.engines.select import FastEngineEstimate, JobSize
from simple_generation.errors import NoEngineError
from simple_generation.formatting import PromptFormatter
from simple_generation.params import ParamsBuilder
from simple_generation.pipeline import plan_call, run_local
from simple_generation.postprocess import PostProcessor
from simple_generation.store import ResultStore, answer_key

from .engine_helpers import EchoEngine, QuickEngine, make_params

GREEDY = make_params(do_sample=False)
SAMPLED = make_params(do_sample=True, temperature=0.7)
JOB = JobSize(requests=4, prompt_tokens=40, new_tokens=40, greedy=True)
SAMPLED_JOB = JobSize(requests=4, prompt_tokens=40, new_tokens=40, greedy=False)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The small engines, registered by name as the real ones are."""
    for name, cls in (("echo", "EchoEngine"), ("greedy-only", "GreedyOnlyEngine"), ("quick", "QuickEngine"),
                      ("broken", "BrokenEngine")):
        monkeypatch.setitem(REGISTRY, name, f"tests.engine_helpers:{cls}")
    monkeypatch.setattr(QuickEngine, "starts", 0)


def context() -> EngineContext:
    return EngineContext(model_name_or_path="tiny", tokenizer=None, config=None, is_encoder_decoder=False)


def fast_engines(*names: str) -> FastEngines:
    """Fast engine candidates that every greedy call pays for (``after_s=0``)."""
    estimates = [FastEngineEstimate(name, startup_s=1.0, speedup=3.0) for name in names]
    return FastEngines(estimates, parameters=10**6, after_s=0, context=context())


def router(*order: str, fast: FastEngines | None = None, **kwargs) -> EngineRouter:
    return EngineRouter(list(order), "the test's order", context(), fast=fast, **kwargs)


# ------------------------------------------------------------------ choice and fallback
def test_the_first_engine_that_supports_the_call_runs_it():
    route = router("greedy-only", "echo").choose([GREEDY], JOB)
    assert (route.name, route.family, route.why) == ("greedy-only", "hf", "the test's order")
    assert route.engine is not None and route.engine.name == "greedy-only"


def test_an_unsupported_call_falls_back_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="simple_generation"):
        route = router("greedy-only", "echo").choose([GREEDY, SAMPLED], JOB)
    assert route.name == "echo"
    assert route.why == "greedy-only does not support this call (it decodes greedily only); fell back to echo"
    assert any("fell back to echo" in record.getMessage() for record in caplog.records)


def test_no_engine_for_the_call_names_each_reason():
    with pytest.raises(NoEngineError, match="greedy-only does not support this call") as raised:
        router("greedy-only").choose([SAMPLED], JOB)
    assert isinstance(raised.value, ValueError)  # what callers caught before the router


def test_an_empty_call_goes_to_the_fallback_engine():
    route = router("greedy-only", "echo").choose([], JobSize(0, 0, 0, True))
    assert route.engine.name == "echo" and route.why == "the test's order"


def test_engines_are_built_once_and_only_the_named_one_gets_the_engine_keywords():
    routes = router("greedy-only", "echo", engine_kwargs={"knob": 1}, kwargs_for="greedy-only")
    assert routes.engine("echo") is routes.engine("echo") is routes.default
    assert routes.engine("greedy-only").received_kwargs == {"knob": 1}
    assert routes.default.received_kwargs == {}
    assert routes.preferred == "greedy-only"


def test_the_order_for_each_requested_engine():
    assert engine_order("auto", is_encoder_decoder=False) == (["continuous", "static"],
                                                              "auto: continuous batching for a causal model")
    assert engine_order("auto", is_encoder_decoder=True) == (["static"], "auto: static batching (encoder-decoder)")
    assert engine_order("continuous", is_encoder_decoder=False) == (["continuous", "static"], "requested")
    assert engine_order("static", is_encoder_decoder=True) == (["static"], "requested")
    with pytest.raises(ValueError, match="encoder-decoder"):
        engine_order("continuous", is_encoder_decoder=True)


def test_the_requested_engine_is_checked_before_loading():
    assert requested_class("auto") is None
    assert requested_class("echo") is EchoEngine
    with pytest.raises(ValueError, match="Unknown engine 'nope'"):
        requested_class("nope")
    with pytest.raises(TypeError, match="engine must be a name"):
        requested_class(3)


def test_capability_flags_say_what_an_engine_class_supports():
    from simple_generation.engines import engine_class

    static, continuous = engine_class("static"), engine_class("continuous")
    assert static.supports_beam_search and not continuous.supports_beam_search
    beams = make_params(num_beams=2)
    assert static.unsupported_params(beams) is None and "beam" in continuous.unsupported_params(beams)
    assert family_of(static) == family_of(continuous) == "hf" and family_of(QuickEngine) == "quick"


# ------------------------------------------------------------------ fast engines
def test_a_fast_engine_is_chosen_but_started_only_when_needed():
    routes = router("echo", fast=fast_engines("quick"))
    route = routes.choose([GREEDY], JOB)
    assert (route.name, route.family, route.engine) == ("quick", "quick", None)
    engine, why = routes.start(route, needed=False)
    assert engine.name == "echo" and why.endswith("(every answer was stored: quick not started)")
    assert QuickEngine.starts == 0
    engine, why = routes.start(route, needed=True)
    assert engine.name == "quick" and QuickEngine.starts == 1
    again = routes.choose([GREEDY], JOB)
    assert again.engine is engine  # started once, reused
    assert routes.start(again)[0] is engine and QuickEngine.starts == 1


def test_sampled_calls_stay_on_the_hf_engines():
    route = router("echo", fast=fast_engines("quick")).choose([SAMPLED], SAMPLED_JOB)
    assert route.name == "echo" and "sampled calls stay on the HF engines" in route.why


def test_a_fast_engine_that_cannot_start_is_dropped(caplog):
    routes = router("echo", fast=fast_engines("broken"))
    route = routes.choose([GREEDY], JOB)
    assert route.family == "broken"
    with caplog.at_level(logging.WARNING, logger="simple_generation"):
        engine, _ = routes.start(route, needed=True)
    assert engine is None
    assert any("broken engine could not start" in record.getMessage() for record in caplog.records)
    fallback = routes.choose([GREEDY], JOB)
    assert (fallback.name, fallback.family) == ("echo", "hf")


# ------------------------------------------------------------------ with the planner: keys name the family
@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return AutoTokenizer.from_pretrained(llama_path)


def identity(family: str) -> str:
    return f'{{"model": "tiny", "family": "{family}"}}'


def plan(tokenizer, prompts, routes, store=None):
    formatter = PromptFormatter(tokenizer)
    builder = ParamsBuilder(GenerationConfig(), DefaultGenerationConfig(), tokenizer.pad_token_id, tokenizer)
    return plan_call(prompts, formatter=formatter, builder=builder,
                     generation_kwargs={"do_sample": False, "max_new_tokens": 3}, params=None,
                     start_empty=lambda ids: ids, context_length=256, is_encoder_decoder=False, truncate=False,
                     on_error="raise", dedup=True, near_duplicates=None, store=store, router=routes,
                     model_identity=identity, skip_prompt=True,
                     postprocessor=PostProcessor(tokenizer, False, formatter.stop_token_ids))


PROMPTS = ["one prompt", "another prompt", "one prompt"]


def test_a_fast_engine_that_fails_to_start_plans_the_call_for_the_fallback_family(tokenizer, tmp_path):
    with ResultStore(tmp_path / "answers.sqlite") as store:
        planned = plan(tokenizer, PROMPTS, router("echo", fast=fast_engines("broken")), store)
        plain = plan(tokenizer, PROMPTS, router("echo"), store)
    assert planned.engine.name == "echo" and planned.model_identity == identity("hf")
    keys = [slot.request.key for slot in planned.slots]
    assert keys == [slot.request.key for slot in plain.slots]
    assert keys[0] == answer_key(identity("hf"), "one prompt", planned.slots[0].request.params.fingerprint, 0)


def test_no_fast_engine_starts_when_every_answer_is_stored(tokenizer, tmp_path):
    path = tmp_path / "answers.sqlite"
    with ResultStore(path) as store:
        first = plan(tokenizer, PROMPTS, router("echo", fast=fast_engines("quick")), store)
        assert first.engine.name == "quick" and first.model_identity == identity("quick")
        assert QuickEngine.starts == 1
        answers = list(run_local(first, first.engine))
        assert len(answers) == 2  # the repeated prompt is generated once
    QuickEngine.starts = 0
    with ResultStore(path) as store:
        rerun = plan(tokenizer, PROMPTS, router("echo", fast=fast_engines("quick")), store)
    assert QuickEngine.starts == 0 and rerun.slots == []
    assert rerun.engine.name == "echo" and "quick not started" in rerun.engine_reason
    assert all(result.cached for result in rerun.ready) and len(rerun.ready) == 3
