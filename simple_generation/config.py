"""Generation defaults and how they combine with the model's own configuration.

Precedence, lowest to highest:

1. the model's ``generation_config`` (its special tokens: EOS ids, decoder start, pad, ...; and any
   other setting it ships, e.g. ``repetition_penalty``);
2. :class:`DefaultGenerationConfig`, which replaces the model's *sampling* defaults;
3. the keywords given to the call.

``temperature=0`` means greedy decoding.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from transformers import GenerationConfig

from .defaults import LIBRARY_MAX_NEW_TOKENS, LIBRARY_TOP_K, LIBRARY_TOP_P
from .io.records import GENERATE_CALL_ARGS  # noqa: F401 - the arguments of `generate` that are not config fields


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


def _check_number(name: str, value: Any, *, integer: bool = False, low: float, low_inclusive: bool,
                  high: float | None = None) -> None:
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or value <= high
    if not (ok_low and ok_high):
        bound = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
        raise ValueError(f"`{name}` must be in {bound}, got {value!r}.")


def validate_generation_values(values: dict[str, Any]) -> None:
    """Raise ``ValueError`` for generation values that can never work."""
    _check_number("max_new_tokens", values.get("max_new_tokens"), integer=True, low=1, low_inclusive=True)
    _check_number("min_new_tokens", values.get("min_new_tokens"), integer=True, low=0, low_inclusive=True)
    _check_number("temperature", values.get("temperature"), low=0, low_inclusive=True)
    _check_number("top_p", values.get("top_p"), low=0, low_inclusive=False, high=1)
    _check_number("top_k", values.get("top_k"), integer=True, low=0, low_inclusive=True)
    _check_number("num_beams", values.get("num_beams"), integer=True, low=1, low_inclusive=True)
    _check_number("num_return_sequences", values.get("num_return_sequences"), integer=True, low=1,
                  low_inclusive=True)
    _check_number("repetition_penalty", values.get("repetition_penalty"), low=0, low_inclusive=False)


def build_generation_config(
    model_config: GenerationConfig | None,
    defaults: DefaultGenerationConfig,
    overrides: dict[str, Any],
    pad_token_id: int | None,
) -> GenerationConfig:
    """Combine the model's config, our defaults and the call's overrides (see module docstring)."""
    validate_generation_values(overrides)
    config = copy.deepcopy(model_config) if model_config is not None else GenerationConfig()
    # A model config may carry `max_length`; with our `max_new_tokens` that only produces a warning.
    for key, value in defaults.to_dict().items():
        setattr(config, key, value)
    for key, value in overrides.items():
        setattr(config, key, value)
    if overrides.get("temperature") == 0:
        config.do_sample = False
    if not config.do_sample:
        for key in _SAMPLING_ONLY:
            if key not in overrides or key == "temperature":
                setattr(config, key, None)
    if config.pad_token_id is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    values = config.to_dict()
    validate_generation_values(values)
    if (
        not config.do_sample
        and (config.num_beams or 1) < (config.num_return_sequences or 1)
    ):
        raise ValueError(
            f"num_return_sequences={config.num_return_sequences} needs sampling (do_sample=True) or "
            f"num_beams >= num_return_sequences; greedy decoding returns one answer per prompt."
        )
    try:
        config.validate(strict=False)
    except ValueError as err:
        raise ValueError(f"Invalid generation settings: {err}") from err
    return config
