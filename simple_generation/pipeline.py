"""The one path every answer takes, from a call's inputs to its results.

inputs -> formatting -> tokenize + validate -> engine choice -> :class:`Request` (keyed) -> store lookup
(resume) -> dedup (fan-in) -> engine stream -> post-processing -> store commit -> fan-out to input positions.

The engine is chosen before the keys because store keys name the engine family (an answer of one engine
is never served as another's), and from the whole call (stored answers included), so a rerun of a killed
job chooses as the first run did.

:func:`plan_call` does everything up to the engine eagerly, so bad input fails before any expensive
work; :func:`run_local` (or the data-parallel exchange) then runs the engine, :func:`finish_request`
post-processes and commits each answer, and :func:`fan_out` turns it into :class:`GenerationResult`
objects for its input positions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .engines.base import Engine
from .engines.router import EngineRouter
from .engines.select import JobSize
from .errors import BatchFailed, BatchGenerationError, GenerationInterrupted
from .formatting import PromptFormatter, content_text
from .params import ParamsBuilder
from .postprocess import PostProcessor
from .requests import EngineOutput, Request
from .results import GenerationResult, RunSummary
from .sampling import mix
from .store import ResultStore, StoredAnswer, answer_key

logger = logging.getLogger("simple_generation")


@dataclass
class Slot:
    """A request and the input positions its answer goes to."""

    request: Request
    positions: list[int]
    prompt: str


@dataclass
class CallPlan:
    """A call, validated and cut into requests; run it with :meth:`results`."""

    n_inputs: int
    slots: list[Slot]
    ready: list[GenerationResult]            # cached, failed before generation, near-duplicates
    prompt_ids: dict[int, list[int]]         # position -> token ids (for the echo)
    skip_prompt: bool
    isolate_errors: bool
    store: ResultStore | None
    model_identity: str
    postprocessor: PostProcessor
    engine: Engine                           # started: the one that runs the call's requests
    engine_reason: str = ""
    stats: RunSummary = field(default_factory=RunSummary)

    def to_generate(self) -> list[Request]:
        return [slot.request for slot in self.slots]


def _text_problem(text: str, where: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"{where} holds a character that is not valid Unicode text (a lone surrogate at position "
                f"{err.start}); fix or drop it.")
    return None


# A prompt longer than context * PROBE_CHARS_PER_TOKEN characters is first tokenized from a piece of that size.
PROBE_CHARS_PER_TOKEN = 16


def probe_too_long(encode: Callable[[list[str]], list[list[int]]], text: str, context_length: int, *,
                   from_end: bool = False) -> list[int] | None:
    """The token ids of a piece of ``text`` that alone proves it longer than the context, or None.

    A 50 MB prompt must not cost minutes and gigabytes to be found too long. A text of more than
    ``context_length * PROBE_CHARS_PER_TOKEN`` characters is tokenized from a piece of that size (its start,
    or with ``from_end`` its end, which truncation keeps): when the piece alone has at least twice the
    context in tokens, the whole text is longer than the context (a piece's tokens differ from the whole
    text's only near the cut) and the rest is never tokenized. Otherwise (very long tokens, a normalizer that
    drops characters) None: tokenize all of it.
    """
    size = context_length * PROBE_CHARS_PER_TOKEN
    if len(text) <= size:
        return None
    ids = encode([text[-size:] if from_end else text[:size]])[0]
    return ids if len(ids) >= 2 * context_length else None


def plan_call(
    inputs: Sequence[str | list[dict[str, str]]],
    *,
    formatter: PromptFormatter,
    builder: ParamsBuilder,
    generation_kwargs: dict[str, Any],
    params: Sequence[dict[str, Any] | None] | None,
    start_empty: Callable[[list[list[int]]], list[list[int]]],
    context_length: int | None,
    is_encoder_decoder: bool,
    truncate: bool,
    on_error: str,
    dedup: bool,
    near_duplicates: float | None,
    store: ResultStore | None,
    router: EngineRouter,
    model_identity: Callable[[str], str],
    skip_prompt: bool,
    postprocessor: PostProcessor,
    vocab_size: int | None = None,
    images: Sequence[Sequence[Any]] | None = None,
    vision: Any = None,
) -> CallPlan:
    """Validate and prepare a call (no generation happens here).

    ``router`` chooses the engine (it may raise :class:`~simple_generation.errors.NoEngineError`, a ValueError,
    when no engine supports the call) and starts a fast one only when something must be generated;
    ``model_identity(family)`` is the model identity in the store keys of that engine family's answers.
    ``images[i]`` are prompt ``i``'s image sources and ``vision`` (a :class:`~simple_generation.vision.VisionInputs`)
    turns them into tokens and pixel tensors: a missing or undecodable image is that prompt's error.
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f'on_error must be "raise" or "record", got {on_error!r}.')
    record = on_error == "record"
    n = len(inputs)
    unusable: dict[int, str] = {}  # prompts that are not valid Unicode: one failed result each under "record"
    for index, item in enumerate(inputs):
        for text in [item] if isinstance(item, str) else [content_text(message["content"]) for message in item]:
            problem = _text_problem(text, f"texts[{index}]")
            if problem is not None:
                if not record:
                    raise ValueError(problem)
                unusable.setdefault(index, problem)

    per_prompt = builder.for_prompts(generation_kwargs, params, n)  # checked, each error naming params[i]

    ready: list[GenerationResult] = []
    failed: set[int] = set()

    def fail(index: int, message: str) -> None:
        if not record:
            raise ValueError(message)
        failed.add(index)
        ready.append(GenerationResult(index=index, error=message))

    for index, problem in unusable.items():
        fail(index, problem)

    # feature: structured output: every distinct constraint compiled once, before anything runs
    if any(p.constraint is not None for p in per_prompt):
        from .constrained import check_constraints

        def where(index: int) -> str:
            own = params[index] if params is not None else None
            return f"params[{index}]" if own is not None else f"prompt {index}"

        for index, problem in check_constraints(per_prompt, builder.tokenizer, vocab_size, where).items():
            if index not in failed:
                fail(index, problem)

    # formatting, one prompt at a time so a refusal names its prompt
    texts: list[str] = [""] * n
    for index, item in enumerate(inputs):
        if index in unusable:
            continue
        try:
            texts[index] = formatter.format_checked(index, item)
        except ValueError as err:  # a template's refusal, reported per prompt
            fail(index, str(err))

    # feature: images: decoded and processed one prompt at a time (pixels are loaded again when the batch runs)
    media: dict[int, Any] = {}
    if images is not None and any(images):
        if vision is None:
            first = next(i for i, found in enumerate(images) if found)
            raise ValueError(f"texts[{first}] has images, and this model takes text only: load an image-text-to-text "
                             "model (e.g. LLaVA, Qwen2-VL, SmolVLM) for image prompts.")
        for index, found in enumerate(images):
            if found and index not in failed:
                if per_prompt[index].prompt_logprobs is not None:
                    fail(index, f"texts[{index}]: prompt_logprobs are not available for prompts with images.")
                    continue
                try:
                    media[index] = vision.process(texts[index], found, f"texts[{index}]")
                except ValueError as err:  # ImageError included: a missing, undecodable or refused image
                    if not record:
                        raise
                    fail(index, str(err))
    if vision is not None and vision.needs_an_image:
        for index in range(n):
            if index not in failed and index not in media:
                fail(index, f"texts[{index}] has no image, and this model ({vision.model_type}) generates from an "
                            "image: give it one.")

    removed: dict[int, int] = {}
    if near_duplicates is not None:
        from .dedup import near_duplicates as find_near_duplicates

        candidates = [i for i in range(n) if i not in failed and i not in media]  # images: never near-duplicates
        found = find_near_duplicates([texts[i] for i in candidates], threshold=near_duplicates)
        removed = {candidates[dup]: candidates[kept] for dup, kept in found.items()}
        for index, kept in removed.items():
            ready.append(GenerationResult(index=index, prompt=texts[index], duplicate_of=kept))

    live = [i for i in range(n) if i not in failed and i not in removed]
    token_ids: dict[int, list[int]] = {}
    probed: set[int] = set()  # far too long: token_ids holds a piece's tokens only (a lower bound of the count)
    for index in live:
        if index in media:
            token_ids[index] = media[index].token_ids
    if context_length is not None:
        for index in live:
            if index in media:
                continue
            ids = probe_too_long(formatter.tokenize, texts[index], context_length, from_end=truncate)
            if ids is not None:
                token_ids[index] = ids
                probed.add(index)
    rest = [i for i in live if i not in probed and i not in media]
    if rest:
        token_ids.update(zip(rest, start_empty(formatter.tokenize([texts[i] for i in rest]))))

    # context room: too long fails (or is truncated); the new tokens are capped to what is left
    budgets: dict[int, int] = {}
    truncated: set[int] = set()
    capped = 0
    too_long: list[int] = []
    for index in live:
        ids = token_ids[index]
        budget = per_prompt[index].max_new_tokens
        if context_length is not None:
            room = context_length if is_encoder_decoder else context_length - len(ids)
            if len(ids) > context_length or (not is_encoder_decoder and room < 1):
                if truncate and index not in media:  # truncating would cut image tokens: too long it is
                    keep = context_length - (0 if is_encoder_decoder else min(budget, context_length - 1))
                    bos = formatter.tokenizer.bos_token_id
                    keep_bos = bos is not None and ids and ids[0] == bos
                    ids = ([bos] if keep_bos else []) + ids[len(ids) - keep + int(keep_bos):]
                    token_ids[index] = ids
                    truncated.add(index)
                    room = context_length if is_encoder_decoder else context_length - len(ids)
                else:
                    too_long.append(index)
                    continue
            if budget > room:
                budget = room
                capped += 1
        budgets[index] = budget
    if too_long:
        def tokens(index: int) -> str:
            return f"{'at least ' if index in probed else ''}{len(token_ids[index])} tokens"

        first = too_long[0]
        message = (f"{len(too_long)} prompt(s) leave no room in the model's context of {context_length} tokens "
                   f"(prompt {first} has {tokens(first)}). Shorten them, or pass "
                   "truncate_prompts=True to keep the end of each prompt.")
        if not record:
            raise ValueError(message)
        for index in too_long:
            failed.add(index)
            ready.append(GenerationResult(index=index, prompt=texts[index], prompt_tokens=len(token_ids[index]),
                                          error=f"prompt {index} has {tokens(index)}, more than the "
                                                f"model's context of {context_length}"))
        live = [i for i in live if i not in failed]
    if capped:
        logger.warning("%d prompt(s) leave less room in the model's context (%d tokens) than max_new_tokens: their "
                       "answers are capped to the room left (finish_reason 'length').", capped, context_length)

    # the engine, from the whole call: it names the family in the store keys
    distinct = list({id(per_prompt[i]): per_prompt[i] for i in live}.values())
    job = JobSize(requests=len(live), prompt_tokens=sum(len(token_ids[i]) for i in live),
                  new_tokens=sum(budgets[i] * per_prompt[i].num_return_sequences for i in live),
                  greedy=all(not p.sampled and p.num_beams == 1 for p in distinct))
    route = router.choose(distinct, job)

    # keys, resume, dedup
    copies: dict[tuple[str, str], int] = {}
    copy_numbers: dict[int, int] = {}
    identity_prompts: dict[int, str] = {}
    for index in live:
        prompt_params = per_prompt[index]
        identity_prompt = texts[index] + (f"\x00truncated:{token_ids[index]}" if index in truncated else "")
        spans = getattr(texts[index], "content_spans", ())
        if spans:  # special-token text of messages, tokenized as text: not the same prompt as the raw string
            identity_prompt += f"\x00content-as-text:{list(spans)}"
        if index in media:  # feature: images: the decoded pixels of each image, in order
            identity_prompt += f"\x00images:{media[index].digests}"
        identity_prompts[index] = identity_prompt
        copy = 0
        if not prompt_params.deterministic:
            group = (identity_prompt, prompt_params.fingerprint)
            copy = copies.get(group, 0)
            copies[group] = copy + 1
        copy_numbers[index] = copy
    while True:  # keys name the engine family: a fast engine that cannot start means other keys
        identity = model_identity(route.family)
        keys = {index: answer_key(identity, identity_prompts[index], per_prompt[index].fingerprint,
                                  copy_numbers[index]) for index in live}
        stored = store.get_many(list(keys.values())) if store is not None else {}
        engine, engine_reason = router.start(route, needed=any(key not in stored for key in keys.values()))
        if engine is not None:
            break
        route = router.choose(distinct, job)  # without the engine that failed to start
    slots: dict[str, Slot] = {}
    ordered_slots: list[Slot] = []
    deduplicated = 0
    for index in live:
        key = keys[index]
        answer = stored.get(key)
        prompt_params = per_prompt[index]
        if answer is not None:
            ready.append(_result_from_answer(index, texts[index], answer, cached=True, postprocessor=postprocessor))
            continue
        if dedup and key in slots:
            slots[key].positions.append(index)
            deduplicated += 1
            continue
        seed = prompt_params.seed
        if seed is not None and copy_numbers.get(index, 0) > 0:
            # copies of a sampled prompt draw independent samples: each copy gets its own seed
            seed = mix(seed, copy_numbers[index], -1)
        request = Request(id=len(ordered_slots), token_ids=token_ids[index], params=prompt_params,
                          max_new_tokens=budgets[index], seed=seed, key=key,
                          media=media[index].media if index in media else None)
        slot = Slot(request, [index], texts[index])
        ordered_slots.append(slot)
        if dedup:
            slots[key] = slot
    cached = sum(1 for r in ready if r.cached)
    if store is not None:
        logger.info("Store %s: %d of %d prompts already answered; generating the rest.", store.path, cached, n)
    stats = RunSummary(prompts=n, cached=cached, deduplicated=deduplicated, near_duplicates=len(removed),
                       capped=capped)
    return CallPlan(n_inputs=n, slots=ordered_slots, ready=ready, prompt_ids=token_ids, skip_prompt=skip_prompt,
                    isolate_errors=record, store=store, model_identity=identity, postprocessor=postprocessor,
                    engine=engine, engine_reason=engine_reason, stats=stats)


def _result_from_answer(index: int, prompt: str, answer: StoredAnswer, cached: bool,
                        postprocessor: PostProcessor | None = None) -> GenerationResult:
    outputs = answer.outputs
    prompt_logprobs = None
    if postprocessor is not None:  # feature: logprobs: token texts decoded here (engines and the store hold ids)
        if answer.logprobs is not None:
            outputs = [replace(output, logprobs=postprocessor.token_logprobs(raw))
                       for output, raw in zip(outputs, answer.logprobs)]
        if answer.prompt_logprobs is not None:
            prompt_logprobs = [None, *postprocessor.token_logprobs(answer.prompt_logprobs)]
        outputs = postprocessor.split_outputs(outputs, prompt)  # feature: reasoning (off: unchanged)
    return GenerationResult(index=index, prompt=prompt, outputs=outputs, prompt_tokens=answer.prompt_tokens,
                            completion_tokens=answer.completion_tokens, error=answer.error, cached=cached,
                            prompt_logprobs=prompt_logprobs)


def _echo(plan: CallPlan, result: GenerationResult) -> None:
    """Put the prompt in front of each output's text (outputs hold continuations until here)."""
    prompt_ids = plan.prompt_ids.get(result.index, [])
    result.outputs = [replace(output, text=plan.postprocessor.echo(prompt_ids, output.token_ids, output.text,
                                                                    output.finish_reason,
                                                                    split=output.reasoning is not None))
                      for output in result.outputs]


def finish_request(plan: CallPlan, slot: Slot, output: EngineOutput) -> StoredAnswer:
    """Post-process one engine output and commit it to the store (before anything is shown)."""
    request = slot.request
    if output.error is not None:
        answer = StoredAnswer(request.key, [], [], [], len(request.token_ids), 0, output.error)
    else:
        texts, kept, reasons, completion = plan.postprocessor.finish(request, output)
        answer = StoredAnswer(request.key, texts, kept, reasons, len(request.token_ids), completion,
                              logprobs=plan.postprocessor.trim_logprobs(output, kept),
                              prompt_logprobs=output.prompt_logprobs)
    if plan.store is not None:
        plan.store.put(answer, plan.model_identity, slot.prompt, request.params.fingerprint)
    return answer


def fan_out(plan: CallPlan, slot: Slot, answer: StoredAnswer) -> list[GenerationResult]:
    """One result per input position of the slot, with the prompt echoed when asked."""
    results = []
    for index in slot.positions:
        result = _result_from_answer(index, slot.prompt, answer, cached=False, postprocessor=plan.postprocessor)
        if not plan.skip_prompt and answer.error is None:
            _echo(plan, result)
        results.append(result)
    return results


def echo_ready(plan: CallPlan, result: GenerationResult) -> GenerationResult:
    """Cached answers are stored as continuations: put the prompt in front when asked."""
    if plan.skip_prompt or not result.cached or result.error is not None:
        return result
    _echo(plan, result)
    return result


def run_local(plan: CallPlan, engine, requests: Sequence[Request] | None = None
              ) -> Iterator[tuple[Slot, StoredAnswer]]:
    """Run the engine over (some of) the plan's requests in this process, committing each answer."""
    slots = {slot.request.id: slot for slot in plan.slots}
    requests = plan.to_generate() if requests is None else requests
    for request, output in engine.run(requests, isolate_errors=plan.isolate_errors):
        slot = slots[request.id]
        yield slot, finish_request(plan, slot, output)


def partial_answers(done: dict[int, GenerationResult]) -> dict[int, Any]:
    return {i: r.answer for i, r in done.items() if r.error is None and r.duplicate_of is None}


def raise_failed(plan: CallPlan, err: BatchFailed, done: dict[int, GenerationResult]) -> None:
    slots = {slot.request.id: slot for slot in plan.slots}
    indices = sorted(i for rid in err.request_ids for i in slots[rid].positions)
    cause = err.cause
    from .scheduling import is_out_of_memory

    hint = (" Out of memory at batch size 1: lower max_new_tokens, load in lower precision or quantized, or "
            "spread the model with device_map='auto'." if is_out_of_memory(cause) else "")
    raise BatchGenerationError(
        f"Generation failed for the batch of prompts {indices}: {type(cause).__name__}: {cause}.{hint} "
        f"The {len(done)} answers already finished are on this exception's `partial`; pass on_error='record' to "
        "keep going past failing prompts.", indices, partial_answers(done)) from cause


def interrupted(done: dict[int, GenerationResult]) -> GenerationInterrupted:
    return GenerationInterrupted(
        f"Interrupted: {len(done)} answers were finished; they are on this exception's `partial` (and in the store, "
        "if one was given: rerun to resume).", partial_answers(done))


def summarize(plan: CallPlan, results: dict[int, GenerationResult], started: float, engine_stats,
              engine_name: str, engine_reason: str) -> RunSummary:
    stats = plan.stats
    stats.sequences = sum(len(r.outputs) for r in results.values())
    stats.wall_time_s = time.perf_counter() - started
    stats.engine = engine_name
    stats.engine_reason = engine_reason
    stats.failures = sorted((i, r.error) for i, r in results.items() if r.error is not None)
    stats.failed = len(stats.failures)
    if engine_stats is not None:
        stats.batches = engine_stats.batches
        stats.batch_size = engine_stats.batch_size
        stats.oom_retries = engine_stats.oom_retries
        stats.forward_passes = engine_stats.forward_passes
        stats.prefix_caching = engine_stats.prefix_caching
        stats.prompt_tokens = engine_stats.prompt_tokens
        stats.prefix_cached_tokens = engine_stats.prefix_cached_tokens
    return stats
