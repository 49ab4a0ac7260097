"""Generation defaults and how they combine with the model's own configuration.

Precedence, lowest to highest:

1. the model's ``generation_config`` (its special tokens: EOS ids, decoder start, pad, ...; and any
   other setting it ships, e.g. ``repetition_penalty``);
2. :class:`DefaultGenerationConfig`, which replaces the model's *sampling* defaults;
3. the keywords given to the call (then a prompt's own ``params``).

The values given are checked once, where they come in (:mod:`simple_generation.sampling_params`);
``temperature=0`` means greedy decoding.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from transformers import GenerationConfig

from .defaults import LIBRARY_MAX_NEW_TOKENS, LIBRARY_TOP_K, LIBRARY_TOP_P
from .sampling_params import GENERATE_CALL_ARGS


@dataclasses.dataclass
class DefaultGenerationConfig:
    """Default generation settings applied to every call unless overridden.

    Example:
        >>> from simple_generation import DefaultGenerationConfig
        >>> DefaultGenerationConfig().max_new_tokens
        512
    """

    max_new_tokens: int = LIBRARY_MAX_NEW_TOKENS
    do_sample: bool = True  # set to False for greedy decoding
    temperature: float = 0.7
    top_p: float = LIBRARY_TOP_P
    top_k: int = LIBRARY_TOP_K
    num_return_sequences: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def split_generation_kwargs(
    kwargs: dict[str, Any], model_forward_params: set[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split call keywords into GenerationConfig fields and other ``generate`` arguments.

    Raises ``TypeError`` for a keyword that neither ``GenerationConfig``, ``generate`` nor the model's
    ``forward`` accepts, so a typo fails before any work starts.
    """
    known_fields = set(GenerationConfig().to_dict()) | set(inspect.signature(GenerationConfig).parameters)
    config_kwargs: dict[str, Any] = {}
    call_kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in kwargs.items():
        if key in GENERATE_CALL_ARGS:
            call_kwargs[key] = value
        elif key in known_fields or hasattr(GenerationConfig(), key):
            config_kwargs[key] = value
        elif model_forward_params is not None and key in model_forward_params:
            call_kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise TypeError(
            f"Unknown generation argument(s): {', '.join(sorted(unknown))}. Pass GenerationConfig fields "
            "(max_new_tokens, do_sample, temperature, top_p, num_beams, ...) or arguments of "
            "`model.generate` (logits_processor, stopping_criteria, streamer, ...)."
        )
    return config_kwargs, call_kwargs


def build_generation_config(
    model_config: GenerationConfig | None,
    defaults: DefaultGenerationConfig,
    overrides: dict[str, Any],
    pad_token_id: int | None,
) -> GenerationConfig:
    """Combine the model's config, our defaults and the call's overrides (see module docstring).

    ``overrides`` are already checked (:class:`~simple_generation.sampling_params.SamplingParams`).
    """
    config = copy.deepcopy(model_config) if model_config is not None else GenerationConfig()
    # A model config may carry `max_length`; with our `max_new_tokens` that only produces a warning.
    for key, value in defaults.to_dict().items():
        setattr(config, key, value)
    for key, value in overrides.items():
        setattr(config, key, value)
    if not config.do_sample:
        for key in _SAMPLING_ONLY:
            if key not in overrides or key == "temperature":
                setattr(config, key, None)
    if config.pad_token_id is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    if (
        not config.do_sample
        and (config.num_beams or 1) < (config.num_return_sequences or 1)
    ):
        raise ValueError(
            f"num_return_sequences={config.num_return_sequences} needs sampling (do_sample=True) or "
            f"num_beams >= num_return_sequences; greedy decoding returns one answer per prompt."
        )
    # The final check of the merged config: the model's own generation_config may hold any value, and
    # `extra` fields (no_repeat_ngram_size, ...) are checked by transformers only.
    try:
        config.validate(strict=False)
    except ValueError as err:
        raise ValueError(f"Invalid generation settings: {err}") from err
    return config
