"""The continuous engine: finished rows leave the batch at once and waiting requests take their place.

A scheduler written on transformers' cache classes (not on transformers' continuous batching, see
docs/engines.md for why). The running batch is one left-padded KV cache written in place
(:class:`~simple_generation.engines.slot_cache.SlotCache`): every row has its own attention-mask zeros
on the left and its own position ids, so a row computes what it would compute alone. Each loop turn

1. *admits* waiting requests when enough slots are free and the cache stays within its memory budget:
   their prompts are prefilled together (one left-padded forward pass, prompts of similar length since
   the queue is sorted), the first token of each is chosen, and their rows are written into free slots,
   left-padded to the running width (a sampled request with ``num_return_sequences=n`` is prefilled
   once and its cache row repeated ``n`` times; a greedy one runs one row and is copied ``n`` times);
2. *decodes* one token for every running row;
3. *retires* rows that hit an EOS id, their own ``max_new_tokens`` or a stop string: the last running
   rows take their slots, the cache columns no remaining row uses are trimmed off the left, and a
   request is yielded as soon as all its rows are done.

Everything runs under ``torch.inference_mode()``.

Decoding follows ``model.generate`` row by row: argmax (greedy); the logits processors HF builds from
the config, applied to each row with its own unpadded ids and prompt length (so repetition penalty,
``min_new_tokens``, ``no_repeat_ngram_size``, bad words, suppress tokens... mean what they mean for
that prompt alone); then the seeded Gumbel-max sampler of :mod:`simple_generation.sampling` (same
noise as the static engine) or, for unseeded sampling, the warpers and ``torch.multinomial``.

Out-of-memory at any step halves the number of slots: the step is undone (the cache cropped back),
the most recently admitted requests go back to the queue and the step runs again; finished requests
are never recomputed.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList

from ..errors import BatchFailed
from ..memory import available_bytes, kv_bytes_per_token
from ..requests import EngineOutput, FinishReason, GenerationParams, RawLogprobs, Request, token_id_list
from ..sampling import greedy_config, gumbel_noise, warpers
from ..scheduling import is_out_of_memory
from .base import EngineBase, EngineContext, EngineStats, input_device
from .logprobs import prompt_logprobs, step_logprobs
from .prefix_cache import BLOCK_SIZE, PrefixCache, block_hashes, shared_blocks
from .slot_cache import SlotCache

logger = logging.getLogger("simple_generation")

# a prefill chunk's cache (rows x (cached prefix + prompt tail) tokens) is at most this many times
# ``max_batch_tokens``: with cached prefixes a chunk of short tails could otherwise hold as many full-width
# rows as the whole running batch, and it is copied into the running cache (both alive at once)
PREFILL_CACHE_FACTOR = 4


def _release_memory() -> None:
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def _eos_ids(config) -> frozenset[int]:
    return frozenset(token_id_list(config.eos_token_id))


def _select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep the batch rows ``index`` of every layer of a prefilled cache, wherever it lives."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            continue
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
        layer.values = layer.values.index_select(0, index.to(layer.values.device))


@dataclass
class _Task:
    """One request in flight: its rows' outputs as they finish."""

    request: Request
    rows: int                     # decoded rows (1 for greedy, n for sampled)
    copies: int                   # outputs per decoded row (n for greedy, 1 for sampled)
    sequences: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[int, FinishReason] = field(default_factory=dict)
    order: int = 0                # admission counter: the latest admitted are evicted first on OOM
    yielded: bool = False
    # feature: logprobs
    logprobs: dict[int, RawLogprobs] = field(default_factory=dict)
    prompt_logprobs: RawLogprobs | None = None

    def output(self) -> EngineOutput:
        sequences, reasons = [], []
        logprobs = [] if self.logprobs else None
        for j in range(self.rows):
            for _ in range(self.copies):
                sequences.append(list(self.sequences[j]))
                reasons.append(self.reasons[j])
                if logprobs is not None:
                    logprobs.append(self.logprobs[j])
        return EngineOutput(sequences=sequences, finish_reasons=reasons, logprobs=logprobs,
                            prompt_logprobs=self.prompt_logprobs)


@dataclass
class _Row:
    """One decoded sequence: sequence ``seq`` of its task's request."""

    task: _Task
    seq: int
    tokens: list[int] = field(default_factory=list)
    processors: LogitsProcessorList | None = None   # None: no processor from the config
    eos: frozenset[int] = frozenset()
    sampled: bool = False
    seed: int | None = None
    warp: LogitsProcessorList | None = None
    stops: tuple[str, ...] = ()
    logprobs_k: int | None = None      # feature: logprobs: alternatives asked for (None: no logprobs)
    logprobs: RawLogprobs | None = None
    matcher: Any = None           # feature: structured output: this sequence's XGrammar matcher (None: free)

    @property
    def budget(self) -> int:
        return self.task.request.max_new_tokens

    @property
    def remaining(self) -> int:
        """New tokens this row may still produce."""
        return self.budget - len(self.tokens)

    @property
    def plain_greedy(self) -> bool:
        return not self.sampled and self.processors is None


class ContinuousEngine(EngineBase):
    """Continuous batching over a left-padded ``DynamicCache``; see the module docstring.

    Knobs (engine keywords): ``max_slots`` (rows decoded together; default 64 on CPU, 128 on an
    accelerator; out-of-memory lowers it), ``max_batch_tokens``
    (padded prompt tokens prefilled in one forward pass, default 2048), ``refill_fraction``
    (admit waiting requests once this fraction of the slots is free, default 0.25), and the KV cache's
    memory: ``kv_cache_memory_bytes`` (a fixed budget) or ``kv_cache_memory_fraction`` (of the memory
    available when a call starts: free RAM on the CPU, free device memory on a GPU; default 0.5). A
    request is admitted only while every running row, padded to the batch's width plus the longest
    answer still to come, fits the budget, so long contexts run fewer rows instead of outgrowing the
    machine (one request always runs, alone if need be).

    Prefix caching (:mod:`~simple_generation.engines.prefix_cache`): ``prefix_cache`` (default True) keeps
    the KV of prompt beginnings that two or more requests share, in blocks of 16 tokens, so each request
    prefills only what follows them; ``prefix_cache_memory_bytes`` or ``prefix_cache_memory_fraction`` (of
    the memory available when the cache is first filled; default 0.1) bound it. The cache lives as long as
    the engine: a later call reuses what an earlier one kept.
    """

    name = "continuous"
    needs_hf_model = True
    # GenerationConfig features that change how decoding works, not only which token a row picks (neutral values)
    unsupported_settings = {
        "assistant_model": None, "prompt_lookup_num_tokens": None, "penalty_alpha": None, "dola_layers": None,
        "constraints": None, "force_words_ids": None, "max_time": None, "watermarking_config": None,
        "guidance_scale": 1,
    }
    # feature: images: a prompt's pixels go into its prefill; decoding steps are text (vision.CONTINUOUS_IMAGE_TYPES)
    supports_images = True
    KWARGS = ("max_slots", "max_batch_tokens", "refill_fraction", "kv_cache_memory_bytes", "kv_cache_memory_fraction",
              "prefix_cache", "prefix_cache_memory_bytes", "prefix_cache_memory_fraction")
    engine_kwargs = frozenset(KWARGS)

    def __init__(self, model, tokenizer, is_encoder_decoder: bool = False, *, max_slots: int | None = None,
                 max_batch_tokens: int = 2048, refill_fraction: float = 0.25,
                 kv_cache_memory_bytes: int | None = None, kv_cache_memory_fraction: float = 0.5,
                 prefix_cache: bool = True, prefix_cache_memory_bytes: int | None = None,
                 prefix_cache_memory_fraction: float = 0.1):
        if max_slots is None:  # measured best on a 2-core CPU; accelerators want wide batches
            device = getattr(model, "device", None)
            max_slots = 64 if device is None or torch.device(device).type == "cpu" else 128
        if not isinstance(max_slots, int) or isinstance(max_slots, bool) or max_slots < 1:
            raise ValueError(f"max_slots must be a positive integer, got {max_slots!r}.")
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}.")
        if not 0 < float(refill_fraction) <= 1:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction!r}.")
        if kv_cache_memory_bytes is not None and (isinstance(kv_cache_memory_bytes, bool)
                                                  or not isinstance(kv_cache_memory_bytes, int)
                                                  or kv_cache_memory_bytes < 1):
            raise ValueError(f"kv_cache_memory_bytes must be a positive integer, got {kv_cache_memory_bytes!r}.")
        if not 0 < float(kv_cache_memory_fraction) <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}.")
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}.")
        if prefix_cache_memory_bytes is not None and (isinstance(prefix_cache_memory_bytes, bool)
                                                      or not isinstance(prefix_cache_memory_bytes, int)
                                                      or prefix_cache_memory_bytes < 0):
            raise ValueError("prefix_cache_memory_bytes must be a non-negative integer, "
                             f"got {prefix_cache_memory_bytes!r}.")
        if not 0 <= float(prefix_cache_memory_fraction) <= 1:
            raise ValueError(f"prefix_cache_memory_fraction must be in [0, 1], got {prefix_cache_memory_fraction!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(is_encoder_decoder)
        self.max_slots = max_slots
        self.max_batch_tokens = max_batch_tokens
        self.refill_fraction = float(refill_fraction)
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.kv_cache_memory_fraction = float(kv_cache_memory_fraction)
        self.prefix_cache = prefix_cache
        self.prefix_cache_memory_bytes = prefix_cache_memory_bytes
        self.prefix_cache_memory_fraction = float(prefix_cache_memory_fraction)
        self._prefixes: PrefixCache | None = None
        self.stats = EngineStats(batch_size=max_slots, prefix_caching=prefix_cache)
        self._call_slots: int | None = None
        # a peft model forwards every keyword to the model it wraps: read that one's signature
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        forward = inspect.signature(base.forward).parameters if base is not None else {}
        self._forward_params = set(forward)
        self._logits_to_keep = "logits_to_keep" in forward
        # transformers >= 5.2x calls it ``cache``, earlier versions ``past_key_values``
        self._cache_arg = next((name for name in ("cache", "past_key_values") if name in forward), None)

    # ------------------------------------------------------------------ protocol
    @classmethod
    def create(cls, context: EngineContext) -> ContinuousEngine:
        kwargs = {k: v for k, v in context.engine_kwargs.items() if k in cls.KWARGS}
        return cls(context.model, context.tokenizer, context.is_encoder_decoder, **kwargs)

    def model_unsupported(self) -> str | None:
        """Why this model cannot run here (None when it can): what its cache or positions need."""
        model = self.model
        if model is None:
            return "the continuous engine needs the loaded transformers model"
        config = model.config
        if self.is_encoder_decoder or getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder models are not supported by the continuous engine"
        if getattr(model, "_is_stateful", False):
            return f"{type(model).__name__} keeps a recurrent state, not a KV cache"
        from ..vision import CONTINUOUS_IMAGE_TYPES, is_vision_config

        if is_vision_config(config) and config.model_type not in CONTINUOUS_IMAGE_TYPES:
            return (f"image-text models of type {config.model_type!r} (their positions or attention depend on the "
                    "images: 3-D rope, prefix-LM masks, query tokens)")
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        if supports is not None and not supports():
            return f"{type(model).__name__} does not use transformers' DynamicCache"
        missing = {"attention_mask", "position_ids"} - self._forward_params
        if self._cache_arg is None:
            missing.add("cache")
        if missing:
            return (f"{type(model).__name__}.forward takes no {', '.join(sorted(missing))}: "
                    "per-row positions in a shared cache need them")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        layer_types = getattr(text, "layer_types", None)
        window = getattr(text, "sliding_window", None)
        if getattr(text, "use_sliding_window", True) is False:
            window = None
        if layer_types is not None:
            other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
            if other:
                return f"layers of type {', '.join(other)} (hybrid or non-attention cache)"
            if "sliding_attention" not in layer_types:
                window = None
        if getattr(text, "attention_chunk_size", None) is not None:
            return "chunked attention"
        if window is not None and (context is None or window < context):
            return f"sliding-window attention (window {window} < context {context})"
        return None

    @classmethod
    def unsupported_params(cls, params: GenerationParams) -> str | None:
        reason = super().unsupported_params(params)
        if reason:
            return reason
        if params.constraint is not None:  # feature: structured output
            from ..constrained import xgrammar_missing

            if xgrammar_missing():
                return xgrammar_missing()
        cache_implementation = getattr(params.config, "cache_implementation", None)
        if cache_implementation not in (None, "dynamic"):
            return f"the continuous engine runs its own cache, not cache_implementation={cache_implementation!r}"
        return None

    def unsupported(self, params: GenerationParams) -> str | None:
        return self.model_unsupported() or self.unsupported_params(params)

    def configure(self, batch_size: int, auto: bool, sort: bool = True) -> None:
        """Per call (the façade): an explicit ``batch_size`` caps the slots; ``"auto"`` keeps ``max_slots``."""
        self._call_slots = None if auto else min(batch_size, self.max_slots)
        self.stats = EngineStats(batch_size=self._call_slots or self.max_slots, prefix_caching=self.prefix_cache)

    def prefixes(self) -> PrefixCache | None:
        """The engine's prefix cache (made at first use, sized then); None when ``prefix_cache=False``."""
        if not self.prefix_cache:
            return None
        if self._prefixes is None:
            budget = self.prefix_cache_memory_bytes
            if budget is None:
                budget = int(self.prefix_cache_memory_fraction * available_bytes(self.input_device))
            self._prefixes = PrefixCache(budget)
        return self._prefixes

    def run(self, requests: Sequence[Request], *, isolate_errors: bool = False
            ) -> Iterator[tuple[Request, EngineOutput]]:
        if not requests:
            return
        for request in requests:
            reason = self.unsupported(request.params)
            if reason:
                raise ValueError(f"The continuous engine cannot run request {request.id}: {reason}.")
        yield from _Scheduler(self, requests, isolate_errors, max_slots=self._call_slots).run()

    # ------------------------------------------------------------------ helpers
    @property
    def input_device(self) -> torch.device:
        """Where the inputs go (see :func:`~simple_generation.engines.base.input_device`)."""
        return input_device(self.model)

    def forward(self, input_ids, attention_mask, position_ids, cache, media: dict | None = None) -> torch.Tensor:
        """One forward pass; the float32 logits of each row's last position, shape (rows, vocab). ``media``: the
        rows' batched processor tensors (pixels, image sizes) of a prefill with images."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self._cache_arg: cache, "use_cache": True, **(media or {})}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = self.model(**kwargs)
        return output.logits[:, -1, :].to(dtype=torch.float32)


class _Scheduler:
    """One ``run``: the queue, the running batch and its cache."""

    def __init__(self, engine: ContinuousEngine, requests: Sequence[Request], isolate_errors: bool,
                 max_slots: int | None = None):
        self.engine = engine
        self.isolate_errors = isolate_errors
        self.max_slots = max_slots or engine.max_slots
        self.device = engine.input_device
        config = engine.model.config
        pad = getattr(engine.tokenizer, "pad_token_id", None)
        vocab = getattr(config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config,
                        "vocab_size", None)
        self.pad_id = pad if pad is not None and (vocab is None or 0 <= pad < vocab) else 0
        self.vocab_size = vocab  # feature: structured output: the width grammars are compiled for
        self.bitmask = None      # a reused CPU token bitmask for the constrained rows of a step
        # longest prompt first: prefill batches of similar lengths, the widest cache early (OOM shows early)
        self.done: list[tuple[Request, EngineOutput]] = []
        queue = []
        for request in requests:
            n = request.params.num_return_sequences
            if request.max_new_tokens <= 0:
                self.done.append((request, EngineOutput(sequences=[[] for _ in range(n)],
                                                        finish_reasons=["length"] * n)))
            elif not request.token_ids:
                self._fail([request], ValueError(f"request {request.id} has no prompt tokens"))
            else:
                queue.append(request)
        self.prefixes = engine.prefixes()
        self.hashes: dict[int, list[int]] = {}   # per request id: its full blocks' hashes (prefix cache on)
        self.wanted: set[int] = set()            # blocks that begin two or more prompts of this run
        self.pending: set[int] = set()           # blocks the chunk being built will compute and keep
        if self.prefixes is not None:  # feature: images: an image's tokens are the same ids whatever the pixels:
            plain = [r for r in queue if r.media is None]  # prompts with images never share or keep blocks
            self.wanted = shared_blocks([r.token_ids for r in plain])
            self.hashes = {id(r): block_hashes(r.token_ids) for r in plain}
        self.waiting: deque[Request] = deque(self._order(queue))
        self.rows: list[_Row] = []
        self.cache: SlotCache | None = None
        self.mask: torch.Tensor | None = None       # (rows, cache length) 1 = real token
        self.lengths: torch.Tensor | None = None    # (rows,) real tokens in the cache = next position id
        self.admitted = 0
        self.admitting: list[Request] = []
        # the KV cache's budget, and its bytes per token (from the config; measured at the first prefill)
        parameter = next(engine.model.parameters(), None)
        self.token_bytes = kv_bytes_per_token(config, parameter.element_size() if parameter is not None else 4)
        self.budget = engine.kv_cache_memory_bytes or int(engine.kv_cache_memory_fraction
                                                          * available_bytes(self.device))

    def _order(self, queue: list[Request]) -> list[Request]:
        """Longest prompt first (prefill batches of similar lengths, the widest cache early, so
        out-of-memory shows early), where the length is what a request will compute: with the prefix
        cache, the first request of each shared beginning computes it all (and keeps it), the others only
        their tail, so they come later, together."""
        if self.prefixes is None or not self.wanted:
            return sorted(queue, key=lambda r: -len(r.token_ids))
        claimed: set[int] = set()
        computed = {}
        for request in sorted(queue, key=lambda r: -len(r.token_ids)):
            if id(request) not in self.hashes:  # a prompt with images: computed whole
                computed[id(request)] = len(request.token_ids)
                continue
            usable = self.hashes[id(request)][:(len(request.token_ids) - 1) // BLOCK_SIZE]
            shared = next((k for k, value in enumerate(usable) if value not in self.wanted), len(usable))
            cached = len(self.prefixes.match(request.token_ids))
            leader = shared > cached and usable[shared - 1] not in claimed
            claimed.update(usable[:shared])
            computed[id(request)] = len(request.token_ids) - BLOCK_SIZE * (cached if leader else max(shared, cached))
        return sorted(queue, key=lambda r: -computed[id(r)])

    # ------------------------------------------------------------------ the loop
    # autograd off while the generator runs (torch re-enters the mode at each resume): a recorded graph
    # would keep every step's activations and cache copies alive
    @torch.inference_mode()
    def run(self) -> Iterator[tuple[Request, EngineOutput]]:
        while self.done:
            yield self.done.pop(0)
        while self.waiting or self.rows:
            if self._should_admit():
                self._guard(self._admit_step, admitting=True)
            elif self.rows:
                self._guard(self._decode_step, admitting=False)
            while self.done:
                yield self.done.pop(0)

    def _guard(self, step, admitting: bool) -> None:
        """Run one step; on out-of-memory shrink and let the loop retry; other errors raise or isolate."""
        self.admitting = []
        try:
            step()
        except Exception as err:  # noqa: BLE001 - sorted below
            # a failed admission has put its requests back at the head of the queue
            involved = ([self.waiting.popleft() for _ in self.admitting] if admitting
                        else list({id(r.task): r.task.request for r in self.rows}.values()))
            if is_out_of_memory(err):
                self._shrink(err, involved, admitting)
            elif self.isolate_errors:
                self._isolate(err, involved, admitting)
            else:
                raise BatchFailed([r.id for r in involved], err) from err

    def _should_admit(self) -> bool:
        if not self.waiting:
            return False
        if not self.rows:  # an empty batch always takes the head (even a request wider than the slots)
            return True
        free = self.max_slots - len(self.rows)
        if free < self._rows_needed(self.waiting[0]) or not self._fits([self.waiting[0]]):
            return False
        waiting_rows = sum(self._rows_needed(r) for r in self.waiting)
        return free >= min(waiting_rows, max(1, math.ceil(self.max_slots * self.engine.refill_fraction)))

    def _cache_bytes(self, extra: Sequence[Request]) -> int:
        """The cache's size with ``extra`` admitted: every row padded to the widest prompt or running row,
        plus room for the longest answer still to come."""
        rows = len(self.rows) + sum(self._rows_needed(r) for r in extra)
        width = max([self.mask.shape[1] if self.rows else 0] + [len(r.token_ids) for r in extra])
        room = max([row.remaining for row in self.rows] + [r.max_new_tokens for r in extra])
        return rows * (width + room) * self.token_bytes

    def _fits(self, extra: Sequence[Request]) -> bool:
        return self._cache_bytes(extra) <= self.budget

    @staticmethod
    def _rows_needed(request: Request) -> int:
        return request.params.num_return_sequences if request.params.sampled else 1

    # ------------------------------------------------------------------ admission
    def _admit_step(self) -> None:
        """Prefill waiting requests into the free slots, in chunks of similar prompt lengths.

        A chunk is one forward pass: at most ``max_batch_tokens`` padded tokens, and a prompt joins it
        only if padding it to the chunk's width wastes little (the queue is sorted longest first).
        """
        while self.waiting and (not self.rows or (self.max_slots - len(self.rows) >= self._rows_needed(self.waiting[0])
                                                  and self._fits([self.waiting[0]]))):
            free = self.max_slots - len(self.rows)
            batch: list[Request] = []
            paths: list[list] = []
            rows = width = columns = 0
            self.pending = set()
            while self.waiting:
                request = self.waiting[0]
                path = self.prefixes.match(request.token_ids) if self.prefixes is not None and request.media is None \
                    else []
                need, length = self._rows_needed(request), len(request.token_ids) - BLOCK_SIZE * len(path)
                if batch:
                    wide = max(width, length)
                    # the chunk's own cache (cached prefixes included) stays a few forward passes' worth: it
                    # is copied into the running cache, so its size adds to the peak
                    cached = BLOCK_SIZE * max(len(path), columns)
                    if (rows + need > free or wide * (len(batch) + 1) > self.engine.max_batch_tokens
                            or (cached + wide) * (rows + need) > PREFILL_CACHE_FACTOR * self.engine.max_batch_tokens
                            or abs(width - length) > max(8, wide // 4) or not self._fits(batch + [request])
                            or self._waits_for_chunk(request, path, length)
                            # feature: images: a chunk with images has no cached prefixes (its rows are whole)
                            or (request.media is not None and columns) or (path and any(r.media for r in batch))):
                        break
                batch.append(self.waiting.popleft())
                paths.append(path)
                self._will_keep(request, path)
                rows += need
                width = max(width, length)
                columns = max(columns, len(path))
            self.admitting = batch
            try:
                self._prefill(batch, paths)
            except BaseException:
                self.waiting.extendleft(reversed(batch))
                raise
            self.admitting = []

    def _keepable(self, request: Request, path: list) -> list[int]:
        """The shared blocks of ``request`` after its cached ``path``: what its prefill will keep."""
        hashes = self.hashes.get(id(request), ())
        kept = []
        for value in hashes[len(path):]:
            if value not in self.wanted:
                break
            kept.append(value)
        return kept

    def _will_keep(self, request: Request, path: list) -> None:
        if self.prefixes is not None:
            self.pending.update(self._keepable(request, path))

    def _waits_for_chunk(self, request: Request, path: list, length: int) -> bool:
        """Whether ``request`` had better wait for the next chunk: a request already in this one computes
        (and keeps) blocks it begins with, worth half or more of what it would compute now."""
        if not self.pending:
            return False
        overlap = 0
        for value in self._keepable(request, path):
            if value not in self.pending:
                break
            overlap += 1
        return 2 * overlap * BLOCK_SIZE >= length

    def _prefill(self, batch: list[Request], paths: list[list]) -> None:
        """One forward pass over the prompts of ``batch`` after their cached prefixes ``paths``.

        Row ``i`` of the cache is ``[zeros | cached prefix | padding | tail]``: the cached blocks right-aligned
        in the first ``blocks * BLOCK_SIZE`` columns, the rest of the prompt left-padded after them; the
        attention mask hides the zeros and the padding, and positions count real tokens only, so each row
        computes what it would compute alone."""
        ready = batch
        cached = [BLOCK_SIZE * len(path) for path in paths]
        tails = [request.token_ids[skip:] for request, skip in zip(ready, cached)]
        width = max(len(tail) for tail in tails)
        input_ids = torch.full((len(ready), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ready), width), dtype=torch.long)
        for i, tail in enumerate(tails):
            input_ids[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[i, width - len(tail):] = 1
        blocks = max(len(path) for path in paths)
        start = torch.tensor(cached, dtype=torch.long).unsqueeze(1)
        positions = (start + mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        if blocks:
            columns = torch.arange(blocks * BLOCK_SIZE).unsqueeze(0)
            mask = torch.cat([(columns >= blocks * BLOCK_SIZE - start).long(), mask], dim=1)
            # one layer gathered at a time: the cache copies each, so only one gathered layer is alive
            cache = DynamicCache(ddp_cache_data=self.prefixes.gather(paths, blocks))
        else:
            cache = DynamicCache()
        media = self._media(ready, [len(tail) for tail in tails], width) if any(r.media for r in ready) else None
        logits = self.engine.forward(input_ids.to(self.device), mask.to(self.device), positions.to(self.device),
                                     cache, media)
        del media
        self.engine.stats.batches += 1
        self.engine.stats.forward_passes += 1
        self.engine.stats.prompt_tokens += sum(len(r.token_ids) for r in ready)
        self.engine.stats.prefix_cached_tokens += sum(cached)
        if self.prefixes is not None and self.wanted and SlotCache.supports(cache):
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            for i, (request, path) in enumerate(zip(ready, paths)):
                if self._keepable(request, path):
                    first = blocks * BLOCK_SIZE + width - len(tails[i])
                    self.prefixes.store(request.token_ids, path, self.wanted, layers, i, first)
        # rows: one per greedy request, n per sampled one (prefilled once, the cache row repeated)
        tasks, new_rows, source = [], [], []
        for i, request in enumerate(ready):
            params = request.params
            n = params.num_return_sequences
            decoded = n if params.sampled else 1
            task = _Task(request, rows=decoded, copies=1 if params.sampled else n, order=self.admitted)
            if params.prompt_logprobs is not None:  # feature: logprobs: an unbatched forward over the prompt
                task.prompt_logprobs = prompt_logprobs(self.engine.model, request.token_ids, params.prompt_logprobs,
                                                       self.device)
            self.admitted += 1
            tasks.append(task)
            for j in range(decoded):
                new_rows.append(self._make_row(task, j))
                source.append(i)
        index = torch.tensor(source, dtype=torch.long, device=logits.device)
        if len(source) != len(ready) or source != list(range(len(ready))):
            logits = logits.index_select(0, index)
            _select_rows(cache, index)
            mask = mask.index_select(0, index.cpu())
        lengths = mask.sum(-1)
        raw = self._raw_logits(new_rows, logits)
        tokens = self._choose(new_rows, logits)
        self._record_logprobs(new_rows, raw, tokens)
        keep = self._append(new_rows, tokens)
        # merge the survivors into the running batch
        if keep:
            keep_index = torch.tensor(keep, dtype=torch.long)
            if len(keep) != len(new_rows):
                _select_rows(cache, keep_index)
                mask = mask.index_select(0, keep_index)
                lengths = lengths.index_select(0, keep_index)
            self._merge([new_rows[i] for i in keep], cache, mask.to(self.device), lengths.to(self.device))
        self._collect(tasks)

    def _media(self, batch: list[Request], lengths: list[int], width: int) -> dict[str, torch.Tensor]:
        """The chunk's processor tensors (feature: images), loaded now and batched as its left-padded rows."""
        from ..vision import model_inputs

        return model_inputs([r.media.tensors() if r.media is not None else None for r in batch], lengths, width,
                            self.engine.model, self.device)

    def _make_row(self, task: _Task, seq: int) -> _Row:
        request = task.request
        params = request.params
        row = _Row(task=task, seq=seq, eos=_eos_ids(params.config), sampled=params.sampled)
        if params.logprobs is not None:  # feature: logprobs
            row.logprobs_k, row.logprobs = params.logprobs, RawLogprobs()
        config = greedy_config(params.config) if params.sampled else copy.deepcopy(params.config)
        config.max_new_tokens = request.max_new_tokens
        config.max_length = len(request.token_ids) + request.max_new_tokens
        model = self.engine.model
        if hasattr(model, "_prepare_special_tokens"):  # tensors some processors read (as generate prepares them)
            model._prepare_special_tokens(config, True, device=self.device)
        processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=len(request.token_ids), device=str(self.device))
        row.processors = processors if len(processors) else None
        if params.sampled:
            row.seed = request.seed
            row.warp = LogitsProcessorList(warpers(params.config))
        stops = list(params.stop_strings)
        config_stops = getattr(params.config, "stop_strings", None)
        if config_stops:
            stops.extend([config_stops] if isinstance(config_stops, str) else config_stops)
        if stops and self.engine.tokenizer is not None:
            row.stops = tuple(dict.fromkeys(s for s in stops if s))
        if params.constraint is not None:  # feature: structured output (compiled when the call was planned)
            from ..constrained import compile_constraint, new_matcher

            compiled = compile_constraint(params.constraint, self.engine.tokenizer, self.vocab_size)
            row.matcher = new_matcher(compiled, sorted(row.eos))
        return row

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        """Add prefilled rows to the running batch (its :class:`SlotCache`), left-padding the narrower side."""
        if not SlotCache.supports(cache):
            raise RuntimeError(f"{type(self.engine.model).__name__}'s cache layers are not plain key/value layers: "
                               "use engine='static'")
        if self.cache is None:  # the exact size, once: the config's estimate served until the first prefill
            self.token_bytes = sum(layer.keys[0, :, :1].numel() * layer.keys.element_size()
                                   + layer.values[0, :, :1].numel() * layer.values.element_size()
                                   for layer in cache.layers)
        running = self.rows + list(rows)
        room = max(row.remaining for row in running)
        width = max(mask.shape[1], self.mask.shape[1] if self.rows else 0)
        # buffers for the rows that may run soon, within the budget (they are zeroed, so they take memory)
        slots = min(self.max_slots, len(running) + sum(self._rows_needed(r) for r in self.waiting),
                    self.budget // max(1, (width + room) * self.token_bytes))
        slots = max(slots, len(running))
        if self.cache is None or not self.rows:
            self.cache = SlotCache(cache, slots, room)
            self.mask, self.lengths, self.rows = mask, lengths, list(rows)
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        total = max(old_len, new_len)
        self.cache.set_room(room)
        self.cache.add(cache, slots)
        self.mask = torch.cat([F.pad(self.mask, (total - old_len, 0)), F.pad(mask, (total - new_len, 0))], dim=0)
        self.lengths = torch.cat([self.lengths, lengths])
        self.rows = running

    # ------------------------------------------------------------------ decoding
    def _decode_step(self) -> None:
        rows = self.rows
        input_ids = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        positions = self.lengths.unsqueeze(1)
        length = self.mask.shape[1]
        try:
            logits = self.engine.forward(input_ids, mask, positions, self.cache)
        except BaseException:
            self._crop(length)
            raise
        self.engine.stats.forward_passes += 1
        stats = self.engine.stats
        stats.peak_rows = max(stats.peak_rows, len(rows))
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, self.cache.allocated_bytes)
        self.mask, self.lengths = mask, self.lengths + 1
        raw = self._raw_logits(rows, logits)
        tokens = self._choose(rows, logits)
        self._record_logprobs(rows, raw, tokens)
        keep = self._append(rows, tokens)
        if len(keep) != len(rows):
            self._select(keep)
        self._collect({id(row.task): row.task for row in rows}.values())

    def _crop(self, length: int) -> None:
        """Undo a failed step's partial cache updates (layers already updated are cut back)."""
        if self.cache is not None:
            self.cache.crop_to(length)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (ascending) and trim the cache columns none of them uses."""
        if not keep:
            self.rows, self.cache, self.mask, self.lengths = [], None, None, None
            return
        used = self.mask.index_select(0, torch.tensor(keep, device=self.mask.device)).any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        order = self.cache.keep(keep, trim=start)
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)[:, start:]
        self.lengths = self.lengths.index_select(0, index)
        self.rows = [self.rows[i] for i in order]

    def _grammar_masks(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The constrained rows and their token bitmask (rows in batch order), filled by their matchers."""
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return constrained, None
        from ..constrained import allocate_bitmask

        if self.bitmask is None or self.bitmask.shape[0] < len(rows):
            self.bitmask = allocate_bitmask(max(len(rows), self.max_slots), self.vocab_size or logits.shape[-1])
        for i in constrained:
            rows[i].matcher.fill_next_token_bitmask(self.bitmask, i)
        return constrained, self.bitmask[:len(rows)].to(logits.device, non_blocking=True)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row, as ``model.generate`` would pick it for that row alone (a constrained
        row's grammar mask applied after its logits processors, before the argmax or the sampler)."""
        constrained, bitmask = self._grammar_masks(rows, logits)
        greedy = logits.argmax(dim=-1)
        plain = [i for i in constrained if rows[i].plain_greedy]
        if plain:  # masked copies of those rows only: the raw logits stay as they are
            from ..constrained import apply_bitmask

            index = torch.tensor(plain, dtype=torch.long, device=logits.device)
            masked = logits.index_select(0, index)
            apply_bitmask(masked, bitmask.index_select(0, index))
            greedy[index] = masked.argmax(dim=-1)
        greedy = greedy.tolist()
        if all(row.plain_greedy for row in rows):
            return greedy
        chosen = []
        for i, row in enumerate(rows):
            if row.plain_greedy:
                chosen.append(greedy[i])
                continue
            scores = logits[i:i + 1]
            ids = None
            if row.processors is not None or row.warp:
                ids = torch.tensor([row.task.request.token_ids + row.tokens], dtype=torch.long, device=logits.device)
            if row.processors is not None:
                scores = row.processors(ids, scores)
            if row.matcher is not None:  # after the other processors, before the argmax or the sampler
                from ..constrained import apply_bitmask

                scores = scores.clone()
                apply_bitmask(scores, bitmask[i:i + 1])
            if not row.sampled:
                chosen.append(int(scores.argmax(dim=-1)))
                continue
            scores = row.warp(ids, scores.float()) if row.warp else scores.float()
            if row.seed is not None:
                noise = gumbel_noise(row.seed, row.seq, len(row.tokens), scores.shape[-1]).to(scores.device)
                chosen.append(int((scores[0] + noise).argmax()))
            else:
                probs = torch.softmax(scores[0], dim=-1)
                chosen.append(int(torch.multinomial(probs, num_samples=1)))
        return chosen

    # feature: logprobs --------------------------------------------------------------------------------
    @staticmethod
    def _raw_logits(rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """A copy of the raw logits of the rows that ask for logprobs (processors may change ``logits``)."""
        asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
        if not asking:
            return None
        return asking, logits.index_select(0, torch.tensor(asking, dtype=torch.long, device=logits.device))

    @staticmethod
    def _record_logprobs(rows: list[_Row], raw: tuple[list[int], torch.Tensor] | None, tokens: list[int]) -> None:
        if raw is None:
            return
        asking, logits = raw
        entries = step_logprobs(logits, [tokens[i] for i in asking], [rows[i].logprobs_k for i in asking])
        for i, (value, top_ids, top_values) in zip(asking, entries):
            record = rows[i].logprobs
            record.token_ids.append(tokens[i])
            record.logprobs.append(value)
            record.top_ids.append(top_ids)
            record.top_logprobs.append(top_values)

    def _append(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Add each row's new token; finish the rows that are done; return the indices still running."""
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.tokens.append(token)
            reason: FinishReason | None = None
            if row.matcher is not None and not row.matcher.accept_token(token):  # feature: structured output
                raise RuntimeError(f"request {row.task.request.id}: the grammar allows no token here (a setting "
                                   "such as min_new_tokens or bad words forbids every token it allows)")
            if token in row.eos or (row.matcher is not None and row.matcher.is_terminated()):
                reason = "stop"
            elif row.stops and self._hit_stop(row):
                reason = "stop_string"
            elif len(row.tokens) >= row.budget:
                reason = "length"
            if reason is None:
                keep.append(i)
            else:
                row.task.sequences[row.seq] = row.tokens
                row.task.reasons[row.seq] = reason
                if row.logprobs is not None:
                    row.task.logprobs[row.seq] = row.logprobs
        return keep

    def _hit_stop(self, row: _Row) -> bool:
        longest = max(len(s) for s in row.stops)
        tail = self.engine.tokenizer.decode(row.tokens[-(2 * longest + 4):], skip_special_tokens=False)
        return any(s in tail for s in row.stops)

    def _collect(self, tasks) -> None:
        for task in tasks:
            if len(task.sequences) == task.rows and not task.yielded:
                task.yielded = True
                self.done.append((task.request, task.output()))

    # ------------------------------------------------------------------ failures
    def _evict(self, keep_rows: int) -> None:
        """Send the latest admitted requests back to the queue until at most ``keep_rows`` rows run."""
        tasks = sorted({id(r.task): r.task for r in self.rows}.values(), key=lambda t: -t.order)
        evicted: set[int] = set()
        remaining = len(self.rows)
        for task in tasks:
            if remaining <= keep_rows:
                break
            evicted.add(id(task))
            remaining -= sum(1 for r in self.rows if r.task is task)
            self.waiting.appendleft(task.request)
        if evicted:
            self._select([i for i, r in enumerate(self.rows) if id(r.task) not in evicted])

    def _shrink(self, err: BaseException, involved: list[Request], admitting: bool) -> None:
        """Halve the slots after an out-of-memory error and put back what must run again."""
        rows = len(self.rows) + (sum(self._rows_needed(r) for r in involved) if admitting else 0)
        if rows <= 1 or (self.max_slots <= 1 and len(involved) <= 1):
            # nothing left to shrink: this request fails on its own
            if not admitting:
                self._select([])
            self._fail(involved, err)
            return
        if self.prefixes is not None and self.prefixes.nodes:
            logger.warning("Out of memory: dropping the prefix cache (%d blocks).", self.prefixes.nodes)
            self.prefixes.clear()
        new_slots = max(1, min(self.max_slots, rows) // 2)
        logger.warning("Out of memory with %d rows (%d slots): retrying with %d slots.", rows, self.max_slots,
                       new_slots)
        self.max_slots = new_slots
        self.engine.stats.batch_size = new_slots
        self.engine.stats.oom_retries += 1
        if admitting:
            self.waiting.extendleft(reversed(involved))
        self._evict(new_slots)
        del err
        _release_memory()

    def _fail(self, requests: list[Request], err: BaseException) -> None:
        if not self.isolate_errors:
            raise BatchFailed([r.id for r in requests], err) from err
        for request in requests:
            self.done.append((request, EngineOutput(error=f"{type(err).__name__}: {err}")))

    def _isolate(self, err: BaseException, involved: list[Request], admitting: bool) -> None:
        """A step failed: run each request it involved alone; those that fail alone get an error."""
        if not admitting:
            self._select([])
        logger.warning("Generation failed (%s: %s): running the %d requests involved one by one.",
                       type(err).__name__, err, len(involved))
        for request in involved:
            try:
                alone = list(_Scheduler(self.engine, [request], isolate_errors=False, max_slots=1).run())
            except Exception as alone_err:  # noqa: BLE001 - this request fails on its own
                cause = alone_err.cause if isinstance(alone_err, BatchFailed) else alone_err
                self.done.append((request, EngineOutput(error=f"{type(cause).__name__}: {cause}")))
                continue
            self.done.extend(alone)
