"""The static engine: transformers' own ``generate`` over padded batches of similar length.

Requests that may share a batch (same parameters but for the token budget and the seed) are sorted
longest first and cut into batches; each batch runs until its rows are done, and its requests are
yielded as soon as it finishes. Out-of-memory halves the batch (the failing batch only; finished
ones are kept). Each row stops at its own ``max_new_tokens`` (a per-row stopping criterion), and
sampled rows with a seed draw their own noise (:mod:`simple_generation.sampling`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..errors import BatchFailed
from ..requests import EngineOutput, RawLogprobs, Request, token_id_list
from ..sampling import SeededSampler, greedy_config
from ..scheduling import is_out_of_memory, release_memory
from .base import EngineBase, EngineContext, EngineStats, input_device
from .logprobs import prompt_logprobs, sequence_logprobs

logger = logging.getLogger("simple_generation")


class RowBudgets(StoppingCriteria):
    """Marks each row done once it has generated its own number of new tokens."""

    def __init__(self, budgets: Sequence[int], start: int):
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.start
        return (generated >= self.budgets).to(input_ids.device)


class StaticEngine(EngineBase):
    """Padded batches through ``model.generate``; see the module docstring.

    The façade sets ``batch_size``/``auto``/``sort`` before each call (:meth:`configure`).
    """

    name = "static"
    needs_hf_model = True
    supports_encoder_decoder = True
    supports_beam_search = True
    supports_generate_kwargs = True  # model.generate takes them all
    supports_images = True  # model.generate takes the processor's pixel tensors

    def __init__(self, model, tokenizer, is_encoder_decoder: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.batch_size = 16
        self.auto = True
        self.sort = True
        self.stats = EngineStats()
        self.on_batch_start = None  # hook for the façade (first-batch compile timing)
        # feature: images: architectures whose image prompts were checked to batch (others run them one at a time)
        from ..vision import BATCHED_MODEL_TYPES

        self.model_type = getattr(model.config, "model_type", "")
        self.batches_images = self.model_type in BATCHED_MODEL_TYPES
        self._logged_single = False
        from ..loading import context_length

        # a padded batch runs to its widest prompt plus its largest budget: keep that inside the context
        self.context_limit = None if is_encoder_decoder else context_length(model.config)

    @classmethod
    def create(cls, context: EngineContext) -> StaticEngine:
        return cls(context.model, context.tokenizer, context.is_encoder_decoder)

    def unsupported(self, params) -> str | None:
        if self.is_encoder_decoder and params.prompt_logprobs is not None:  # feature: logprobs
            return "prompt_logprobs needs a causal (decoder-only) model: an encoder's input is not predicted"
        return super().unsupported(params)

    @classmethod
    def unsupported_params(cls, params) -> str | None:
        if params.constraint is not None:  # feature: structured output
            from ..constrained import xgrammar_missing

            if xgrammar_missing():
                return xgrammar_missing()
        return super().unsupported_params(params)

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        self.batch_size, self.auto, self.sort = batch_size, auto, sort
        self.stats = EngineStats(batch_size=batch_size)

    # ------------------------------------------------------------------ inputs
    @property
    def input_device(self) -> torch.device:
        """Where the inputs go (see :func:`~simple_generation.engines.base.input_device`)."""
        return input_device(self.model)

    def pad(self, token_ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in token_ids)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        # left padding for decoder-only models, right padding for encoders (see load_tokenizer)
        right = self.is_encoder_decoder
        for row, ids in enumerate(token_ids):
            if ids:
                span = slice(0, len(ids)) if right else slice(width - len(ids), width)
                input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, span] = 1
        device = self.input_device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[Request]) -> list[EngineOutput]:
        params = requests[0].params
        n = params.num_return_sequences
        budgets = [r.max_new_tokens for r in requests]
        call_kwargs = dict(params.call_kwargs)
        seeded = params.sampled and params.num_beams == 1 and any(r.seed is not None for r in requests)
        # seeded sampling decodes greedily over its own noise; greedy decoding returns one sequence per row,
        # so the n sequences of a request become n rows here
        rows_per_request = n if seeded and n > 1 else 1
        inputs = self.pad([r.token_ids for r in requests for _ in range(rows_per_request)])
        if any(r.media is not None for r in requests):  # feature: images: pixel tensors batched with their rows
            inputs.update(self._media(requests, rows_per_request, inputs["input_ids"].shape[1]))
        # the budget is the requests' own (capped to the context), never the parameters' requested one
        config = greedy_config(params.config) if seeded else copy.deepcopy(params.config)
        config.max_new_tokens = max(budgets)
        if rows_per_request > 1:
            config.num_return_sequences = 1
        stopping = []
        if len(set(budgets)) > 1:
            start = 1 if self.is_encoder_decoder else inputs["input_ids"].shape[1]
            stopping.append(RowBudgets([b for b in budgets for _ in range(n)], start))
        if stopping:
            call_kwargs["stopping_criteria"] = StoppingCriteriaList(
                list(call_kwargs.get("stopping_criteria") or []) + stopping)
        if any(r.params.constraint is not None for r in requests):  # feature: structured output
            # the grammar masks come after the caller's processors, before the seeded sampler (added below)
            call_kwargs["logits_processor"] = LogitsProcessorList(
                list(call_kwargs.get("logits_processor") or []) + [self._grammar_processor(requests, n, config)])
        if seeded:
            rows = []
            for r in requests:
                seed = r.seed if r.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
                rows.extend((seed, j) for j in range(n))
            call_kwargs["logits_processor"] = LogitsProcessorList(
                list(call_kwargs.get("logits_processor") or []) + [SeededSampler(params.config, rows)])
        # feature: logprobs: the raw logits of every step (before any processor), for the rows that ask
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        if want_logprobs:
            config.output_logits = True
            config.return_dict_in_generate = True
        if self.on_batch_start is not None:
            self.on_batch_start(len(requests))
        output = self.model.generate(**inputs, generation_config=config, **call_kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences if self.is_encoder_decoder else sequences[:, inputs["input_ids"].shape[1]:]
        if self.is_encoder_decoder:
            start_ids = config.decoder_start_token_id
            start_id = start_ids[0] if isinstance(start_ids, list) else start_ids
            rows_list = new_tokens.tolist()
            rows_list = [row[1:] if row and start_id is not None and row[0] == start_id else row for row in rows_list]
        else:
            rows_list = new_tokens.tolist()
        pad_id = config.pad_token_id
        eos_ids = set(token_id_list(config.eos_token_id))
        if pad_id is not None and pad_id not in eos_ids and any(r.params.stop_strings for r in requests):
            # rows that stopped on a stop string are padded up to the batch's end (rows past their own budget are
            # cut to it below, rows past EOS by post-processing: a pad token a row really generated stays)
            rows_list = [_strip_trailing(row, pad_id) for row in rows_list]
        per = len(rows_list) // len(requests)
        outputs = [EngineOutput(sequences=[row[: r.max_new_tokens] for row in rows_list[i * per:(i + 1) * per]])
                   for i, r in enumerate(requests)]
        if want_logprobs:
            self._add_logprobs(requests, outputs, output.logits, per)
        for request, engine_output in zip(requests, outputs):
            if request.params.prompt_logprobs is not None:
                engine_output.prompt_logprobs = prompt_logprobs(self.model, request.token_ids,
                                                                request.params.prompt_logprobs, self.input_device)
        return outputs

    def _media(self, requests: Sequence[Request], rows_per_request: int, width: int) -> dict[str, torch.Tensor]:
        from ..vision import model_inputs

        loaded = [r.media.tensors() if r.media is not None else None for r in requests]
        rows = [media for media in loaded for _ in range(rows_per_request)]
        lengths = [len(r.token_ids) for r in requests for _ in range(rows_per_request)]
        return model_inputs(rows, lengths, width, self.model, self.input_device)

    @staticmethod
    def _add_logprobs(requests: Sequence[Request], outputs: list[EngineOutput], logits: tuple[torch.Tensor, ...],
                      per: int) -> None:
        """Each asking request's sequences' logprobs from ``generate``'s raw logits (one tensor per step, a row
        per sequence: request ``i``'s sequences are rows ``i * per ...``)."""
        for i, (request, engine_output) in enumerate(zip(requests, outputs)):
            k = request.params.logprobs
            if k is None:
                continue
            engine_output.logprobs = []
            for j, sequence in enumerate(engine_output.sequences):
                row = i * per + j
                steps = torch.stack([step[row] for step in logits[: len(sequence)]]) if sequence else None
                engine_output.logprobs.append(sequence_logprobs(steps, sequence, k) if sequence else RawLogprobs())

    def _grammar_processor(self, requests: Sequence[Request], n: int, config):
        """One grammar matcher per batch row (``n`` rows per request, as ``generate`` lays them out)."""
        from ..constrained import GrammarLogitsProcessor, compile_constraint, model_vocab_size, new_matcher

        vocab = model_vocab_size(self.model.config)
        stops = sorted(set(token_id_list(config.eos_token_id)))
        matchers = []
        for request in requests:
            constraint = request.params.constraint
            compiled = None if constraint is None else compile_constraint(constraint, self.tokenizer, vocab)
            matchers.extend(None if compiled is None else new_matcher(compiled, stops) for _ in range(n))
        return GrammarLogitsProcessor(matchers, vocab or self.model.config.vocab_size)

    # ------------------------------------------------------------------ the stream
    def _order(self, requests: Sequence[Request]) -> list[list[Request]]:
        """Groups of requests that may share a batch, each sorted longest first (stable)."""
        groups: dict[str, list[Request]] = {}
        for request in requests:
            # beam search ranks finished beams by length: rows of one batch must share the budget
            key = request.params.batch_key + (f"|{request.max_new_tokens}" if request.params.num_beams > 1 else "")
            groups.setdefault(key, []).append(request)
        ordered = []
        for group in groups.values():
            if self.sort:
                group = sorted(group, key=lambda r: -len(r.token_ids))
            ordered.append(group)
        # the group holding the longest prompt first, so "auto" settles its size early
        ordered.sort(key=lambda g: -max(len(r.token_ids) for r in g) if self.sort else 0)
        return ordered

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        for group in self._order(requests):
            yield from self._run_group(group, isolate_errors)

    def _run_group(self, group: list[Request], isolate_errors: bool) -> Iterator[tuple[Request, EngineOutput]]:
        position = 0
        while position < len(group):
            batch = self._fitting(group[position: position + self.batch_size])
            if not self.batches_images and len(batch) > 1 and any(r.media is not None for r in batch):
                if not self._logged_single:
                    logger.info("Image prompts of %s models run one at a time (batching them is not verified for "
                                "this architecture).", self.model_type)
                    self._logged_single = True
                batch = batch[:1]
            try:
                outputs = self.generate_batch(batch)
            except Exception as err:
                if is_out_of_memory(err) and self.batch_size > 1 and len(batch) > 1:
                    new_size = max(1, len(batch) // 2)
                    logger.warning("Out of memory at batch size %d: retrying this batch at %d.", len(batch), new_size)
                    if not self.auto:
                        logger.warning('batch_size=%d did not fit; use batch_size="auto" to search for the '
                                       "largest size that does.", len(batch))
                    self.batch_size = new_size
                    self.stats.batch_size = new_size
                    self.stats.oom_retries += 1
                    del err
                    release_memory()
                    continue
                if isolate_errors:
                    yield from self._isolate(batch, err)
                    position += len(batch)
                    continue
                raise BatchFailed([r.id for r in batch], err) from err
            self.stats.batches += 1
            yield from zip(batch, outputs)
            position += len(batch)

    def _fitting(self, batch: list[Request]) -> list[Request]:
        """The longest prefix of ``batch`` whose padded width plus largest budget fits in the context."""
        if self.context_limit is None:
            return batch
        width = budget = 0
        for count, request in enumerate(batch):
            width, budget = max(width, len(request.token_ids)), max(budget, request.max_new_tokens)
            if count and width + budget > self.context_limit:
                return batch[:count]
        return batch

    def _isolate(self, batch: list[Request], err: BaseException) -> Iterator[tuple[Request, EngineOutput]]:
        """Bisect a failing batch: requests that fail alone get an error, the others their answers."""
        if len(batch) == 1:
            yield batch[0], EngineOutput(error=f"{type(err).__name__}: {err}")
            return
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            try:
                outputs = self.generate_batch(half)
            except Exception as half_err:  # noqa: BLE001 - narrowed down further
                if is_out_of_memory(half_err) and len(half) == 1:
                    yield half[0], EngineOutput(error=f"{type(half_err).__name__}: {half_err}")
                    continue
                yield from self._isolate(half, half_err)
                continue
            self.stats.batches += 1
            yield from zip(half, outputs)


def _strip_trailing(row: list[int], pad_id: int) -> list[int]:
    end = len(row)
    while end and row[end - 1] == pad_id:
        end -= 1
    return row[:end]
