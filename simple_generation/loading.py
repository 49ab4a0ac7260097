"""Load a checkpoint (hub id or local folder) and its tokenizer, ready for batched generation."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import ModelLoadError
from .model_options import (
    Placement,
    accelerator_memory,
    attach_lora,
    attention_kwargs,
    choose_placement,
    enable_compile,
    estimate_model_bytes,
    model_quantization,
    quantization_method,
    translate_quantization,
)

logger = logging.getLogger("simple_generation")

# Config attributes that hold the longest sequence a model can attend to, by architecture family.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                       "max_seq_len", "n_ctx")


_TOKENIZER_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")


@dataclass
class LoadedModel:
    """What :func:`load_for_generation` returns; the last fields feed the initialization summary."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_encoder_decoder: bool
    placement: str
    placement_reason: str = ""
    lora: str | None = None
    quantization: str | None = None
    compiled: bool = False
    attention: str | None = None
    processor: Any = None  # image-text-to-text models: their processor (tokenizer + image processor)


def load_config(name_or_path: str, **kwargs: Any) -> PretrainedConfig:
    """Read the model's config, turning the many ways a path or hub id can be wrong into one clear error."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"model_name_or_path must be a hub id or a local folder, got {name_or_path!r}.")
    config_keys = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")
    config_kwargs = {k: kwargs[k] for k in config_keys if k in kwargs}
    if "gguf_file" in kwargs:
        config_kwargs["gguf_file"] = kwargs["gguf_file"]
    try:
        return AutoConfig.from_pretrained(str(name_or_path), **config_kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, HF hub errors...
        name = str(name_or_path)
        looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
        if os.path.isdir(name):
            hint = f"The folder {name!r} exists but has no readable config.json."
        elif looks_like_hub_id:
            hint = (
                f"There is no local folder {name!r}, and the hub id could not be resolved: check the id "
                "(and `revision`), your network and HF_TOKEN, or pass a local folder saved with `save_pretrained`."
            )
        else:
            hint = f"No folder {name!r} with a config.json exists."
        raise ModelLoadError(f"Could not load the model config for {name_or_path!r}. {hint} ({err})") from err


def load_tokenizer(name_or_path: str, padding_side: str = "left", vocab_size: int | None = None,
                   **kwargs: Any) -> PreTrainedTokenizerBase:
    """Tokenizer padding on ``padding_side``, with a pad token the model can embed.

    Decoder-only models pad on the left so every prompt ends where generation starts; encoder-decoders
    pad on the right, because encoders with absolute positions (BART, Marian, Pegasus...) would
    otherwise see each prompt shifted by its padding. A tokenizer without a pad token pads with EOS; so
    does one whose pad id is past the model's ``vocab_size`` (some tokenizer classes add a default pad
    token the checkpoint never had, which would crash the first padded batch).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"Could not load a tokenizer from {name_or_path!r}. Pass `tokenizer_name_or_path=` if the "
            f"tokenizer lives elsewhere. ({err})"
        ) from err
    tokenizer.padding_side = padding_side

    def embeddable(token_id: int | None) -> bool:
        return token_id is not None and (vocab_size is None or token_id < vocab_size)

    if tokenizer.pad_token is not None and embeddable(tokenizer.pad_token_id):
        return tokenizer
    problem = "The tokenizer has no pad token" if tokenizer.pad_token is None else (
        f"The tokenizer's pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) is outside the "
        f"model's {vocab_size} embeddings")
    if tokenizer.eos_token is None or not embeddable(tokenizer.eos_token_id):
        raise ModelLoadError(
            f"{problem}, and it has no usable EOS token to pad with instead ({name_or_path!r}); batched "
            "generation needs one. Set `tokenizer.pad_token` and pass the tokenizer's folder."
        )
    logger.warning("%s: padding with the EOS token %r.", problem, tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_class_for(config: PretrainedConfig):
    """AutoModelForImageTextToText for vision-language models, AutoModelForSeq2SeqLM for encoder-decoders,
    AutoModelForCausalLM otherwise."""
    from .vision import is_vision_config

    if is_vision_config(config):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _processor_class(name_or_path: str, **kwargs: Any) -> type:
    """The processor class a checkpoint names (its processor or tokenizer config, else its model type's)."""
    import json

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = os.path.join(str(name_or_path), file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                name = json.load(handle).get("processor_class")
            if name and hasattr(transformers, name):
                return getattr(transformers, name)
    model_type = load_config(name_or_path, **kwargs).model_type
    return getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])


@functools.cache
def _images_only(processor_class: type) -> type:
    """``processor_class`` without its video processor (transformers builds one only with torchvision installed)."""

    class ImagesOnly(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


def load_processor(name_or_path: str, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> Any:
    """An image-text model's processor (``AutoProcessor``), sharing ``tokenizer`` (padding side, pad token)."""
    from transformers import AutoProcessor

    try:
        try:
            processor = AutoProcessor.from_pretrained(str(name_or_path), **kwargs)
        except ImportError as err:  # a video processor needs torchvision; images alone do not
            if "torchvision" not in str(err).lower():
                raise
            processor = _images_only(_processor_class(name_or_path, **kwargs)).from_pretrained(str(name_or_path),
                                                                                               **kwargs)
            logger.info("torchvision is not installed: %s loaded without its video processor (images work).",
                        type(processor).__name__)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"Could not load the image processor of {name_or_path!r}: image-text models need their "
                             f"processor files (preprocessor_config.json) beside the model. ({err})") from err
    if not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{name_or_path!r} is an image-text model, but AutoProcessor gave a "
                             f"{type(processor).__name__} without an image processor.")
    processor.tokenizer = tokenizer
    return processor


def context_length(config: PretrainedConfig) -> int | None:
    """The longest input a model with this config attends to, or None when the architecture sets no bound."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def normalize_dtype_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept both ``torch_dtype`` (transformers 4) and ``dtype`` (transformers 5)."""
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        if "dtype" in kwargs and _as_dtype(kwargs["dtype"]) != _as_dtype(torch_dtype):
            raise ValueError(f"Pass either `dtype` or `torch_dtype`, not both with different values (got "
                             f"dtype={kwargs['dtype']!r}, torch_dtype={torch_dtype!r}).")
        kwargs["dtype"] = torch_dtype
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        dtype = _as_dtype(kwargs["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {kwargs['dtype']!r}: use 'auto', 'float32', 'bfloat16', 'float16' or a "
                             "torch.dtype.")
        kwargs["dtype"] = dtype
    return kwargs


def _as_dtype(value: Any) -> Any:
    """'float32' / 'torch.float32' / torch.float32 -> torch.float32 ('auto' and unknowns unchanged)."""
    if isinstance(value, str) and value != "auto":
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else value
    return value


@dataclass(frozen=True)
class LoadOptions:
    """What to do to the model beyond ``from_pretrained`` (see :class:`~simple_generation.SimpleGenerator`)."""

    lora_weights: str | None = None
    merge_lora: bool = True
    compile_model: bool = False
    use_bettertransformer: bool = False
    # the caller's own keywords (SimpleGenerator's), offered as spellings when a keyword is unknown
    own_keywords: tuple[str, ...] = ()


def load_for_generation(
    model_name_or_path: str,
    tokenizer_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    options: LoadOptions = LoadOptions(),
    **model_kwargs: Any,
) -> LoadedModel:
    """Config, tokenizer and model, placed on ``device`` (or per ``device_map``), ready for ``generate``.

    Every option that cannot work here (bitsandbytes without CUDA, both ``device`` and ``device_map``...)
    raises before any weights are read.
    """
    model_kwargs = translate_quantization(normalize_dtype_kwargs(model_kwargs))
    if device is not None and model_kwargs.get("device_map") is not None:
        raise ValueError("Pass either `device` or `device_map`, not both.")
    config = load_config(model_name_or_path, **model_kwargs)
    if options.lora_weights is not None:
        check_adapter_path(options.lora_weights)
    from .vision import is_vision_config

    vision = is_vision_config(config)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False)) and not vision
    tokenizer_kwargs = {k: model_kwargs[k] for k in _TOKENIZER_KWARGS if k in model_kwargs}
    if "gguf_file" in model_kwargs and tokenizer_name_or_path is None:
        tokenizer_kwargs["gguf_file"] = model_kwargs["gguf_file"]
    tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                               padding_side="right" if is_encoder_decoder else "left",
                               vocab_size=getattr(config.get_text_config(), "vocab_size", None), **tokenizer_kwargs)
    processor = load_processor(tokenizer_name_or_path or model_name_or_path, tokenizer, **tokenizer_kwargs) \
        if vision else None

    quantization = model_quantization(model_kwargs, config)
    if model_kwargs.get("device_map") is not None:
        placement = Placement(None, model_kwargs["device_map"], "device_map given")
    elif device is not None:
        placement = Placement(str(device), None, "device given")
    else:
        accelerator, free_memory = accelerator_memory()
        model_bytes = estimate_model_bytes(model_class_for(config), config, model_kwargs) if accelerator else None
        placement = choose_placement(model_bytes, accelerator, free_memory)
    target = torch.device(placement.device) if placement.device is not None else None
    device_type = target.type if target is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    model_kwargs = attention_kwargs(options.use_bettertransformer, model_kwargs, device_type)
    if placement.device_map is not None:
        model_kwargs["device_map"] = placement.device_map
    elif target is not None and target.type == "cuda":
        index = target.index if target.index is not None else torch.cuda.current_device()
        model_kwargs["device_map"] = {"": f"cuda:{index}"}  # straight onto the GPU (what quantized loads need)

    model = load_model(model_name_or_path, config, own_keywords=options.own_keywords, **model_kwargs)
    if target is not None and "device_map" not in model_kwargs:
        model.to(target)
    lora = None
    if options.lora_weights is not None:
        model, mode = attach_lora(model, options.lora_weights, options.merge_lora,
                                  quantized=quantization is not None, **model_kwargs)
        lora = f"{options.lora_weights} ({mode})"
    if options.compile_model:
        enable_compile(model, device_type)
    hf_map = getattr(model, "hf_device_map", None)
    where = str(model.device) if not hf_map or len(set(hf_map.values())) == 1 else \
        f"device_map over {sorted({str(v) for v in hf_map.values()})}"
    return LoadedModel(model, tokenizer, is_encoder_decoder, where, placement.reason, lora, quantization,
                       options.compile_model, getattr(model.config, "_attn_implementation", None), processor)


def check_adapter_path(lora_weights: str) -> None:
    """A LoRA adapter that is neither a folder nor shaped like a hub id fails before the base model loads."""
    name = str(lora_weights)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "adapter_config.json")):
            raise ModelLoadError(f"The LoRA adapter folder {name!r} has no adapter_config.json: pass a folder saved "
                                 "with peft's save_pretrained.")
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) is None:
        raise ModelLoadError(f"Could not load the LoRA adapter {name!r}: no such folder, and it is not a hub id "
                             "(owner/name).")


def load_model(name_or_path: str, config: PretrainedConfig, own_keywords: Sequence[str] = (),
               **kwargs: Any) -> PreTrainedModel:
    model_cls = model_class_for(config)
    try:
        model = model_cls.from_pretrained(str(name_or_path), **kwargs)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        if match is None or match.group(1) not in kwargs:
            raise
        raise TypeError(_unknown_keyword_message(match.group(1), own_keywords)) from err
    except OSError as err:
        raise ModelLoadError(f"Could not load {model_cls.__name__} weights from {name_or_path!r}: {err}") from err
    except ImportError as err:
        method = quantization_method(getattr(config, "quantization_config", None))
        if "gguf_file" in kwargs:
            hint = "GGUF files need the gguf package: pip install -e '.[gguf]' in a clone of simple-generation."
        elif method is not None:
            hint = f"This checkpoint is quantized with {method}: install that method's library."
        else:
            hint = "Install the package named above."
        raise ImportError(f"Could not load {name_or_path!r}: {err} {hint}") from err
    model.eval()
    return model


def _unknown_keyword_message(name: str, ours: Sequence[str] = ()) -> str:
    """Name a keyword neither SimpleGenerator (``ours``: its keywords) nor from_pretrained knows, with close
    spellings."""
    import difflib
    import inspect

    from transformers import PreTrainedModel

    theirs = [p for p in inspect.signature(PreTrainedModel.from_pretrained).parameters
              if p not in ("cls", "args", "kwargs", "model_args")]
    extra = ["dtype", "torch_dtype", "device_map", "trust_remote_code", "revision", "attn_implementation",
             "quantization_config", "load_in_8bit", "load_in_4bit", "gguf_file", "max_memory", "low_cpu_mem_usage"]
    close = difflib.get_close_matches(name, sorted(set(ours) | set(theirs) | set(extra)), n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"Unknown keyword argument {name!r}: neither SimpleGenerator nor the model's from_pretrained accepts it."
            f"{hint}")
