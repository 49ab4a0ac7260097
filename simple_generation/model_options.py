"""Loading options beyond plain ``from_pretrained``: quantization, attention kernels, placement, LoRA, compile.

Each function takes what the user passed and returns what transformers/peft/torch need, raising a clear
error *before* any weights are read when an option cannot work on this machine.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelLoadError

logger = logging.getLogger("simple_generation")

_QUANTIZATION_EXTRA = "pip install -e '.[quantization]' in a clone of simple-generation"


# ------------------------------------------------------------------ quantization
def translate_quantization(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn the original README's ``load_in_8bit=True`` / ``load_in_4bit=True`` into a ``BitsAndBytesConfig``.

    A ``quantization_config`` given directly passes through unchanged. 4-bit weights compute in the
    requested ``dtype`` (bfloat16 when none is given). Raises when bitsandbytes cannot run here (it needs
    a CUDA GPU and the ``quantization`` extra), before anything is loaded.

    Example:
        >>> translate_quantization({"load_in_4bit": True})["quantization_config"].load_in_4bit   # doctest: +SKIP
        True
    """
    kwargs = dict(kwargs)
    in_8bit = bool(kwargs.pop("load_in_8bit", False))
    in_4bit = bool(kwargs.pop("load_in_4bit", False))
    if in_8bit and in_4bit:
        raise ValueError("Pass either load_in_8bit=True or load_in_4bit=True, not both.")
    if (in_8bit or in_4bit) and kwargs.get("quantization_config") is not None:
        raise ValueError("Pass either load_in_8bit/load_in_4bit or quantization_config, not both.")
    if in_8bit or in_4bit:
        from transformers import BitsAndBytesConfig

        if in_8bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            compute_dtype = kwargs.get("dtype")
            if not isinstance(compute_dtype, torch.dtype):
                compute_dtype = torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4")
    config = kwargs.get("quantization_config")
    if config is not None and quantization_method(config) == "bitsandbytes":
        check_bitsandbytes_usable("load_in_4bit" if in_4bit else "load_in_8bit" if in_8bit else "bitsandbytes")
    return kwargs


def quantization_method(config: Any) -> str | None:
    """``"bitsandbytes"``, ``"gptq"``, ``"awq"``, ... for a quantization config object or dict."""
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        return None
    method = str(method).lower()
    return "bitsandbytes" if method.startswith("bitsandbytes") else method


def model_quantization(kwargs: dict[str, Any], config: Any) -> str | None:
    """The quantization method a load will use: the ``quantization_config`` passed, else the checkpoint's."""
    return quantization_method(kwargs.get("quantization_config")) or \
        quantization_method(getattr(config, "quantization_config", None))


def check_bitsandbytes_usable(option: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{option} quantizes with bitsandbytes, which needs a CUDA GPU, and none is available here. "
            "On a CPU, load the model unquantized (e.g. dtype=torch.bfloat16), or use a GGUF file "
            "(gguf_file=...)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{option} needs the bitsandbytes package: {_QUANTIZATION_EXTRA}.")


# ------------------------------------------------------------------ attention
def fastest_attention(device_type: str, dtype: torch.dtype | None) -> str:
    """FlashAttention 2 on a CUDA GPU in half precision when installed, PyTorch's SDPA otherwise."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def attention_kwargs(use_bettertransformer: bool, kwargs: dict[str, Any], device_type: str) -> dict[str, Any]:
    """Map ``use_bettertransformer=True`` (optimum's BetterTransformer no longer exists) to an attention kernel."""
    kwargs = dict(kwargs)
    if not use_bettertransformer:
        return kwargs
    if kwargs.get("attn_implementation") is not None:
        logger.info("use_bettertransformer=True: keeping the attn_implementation=%r you passed.",
                    kwargs["attn_implementation"])
        return kwargs
    dtype = kwargs.get("dtype") if isinstance(kwargs.get("dtype"), torch.dtype) else None
    kwargs["attn_implementation"] = fastest_attention(device_type, dtype)
    logger.info("use_bettertransformer=True: BetterTransformer is gone from optimum; using "
                "attn_implementation=%r instead, the fastest attention available here.",
                kwargs["attn_implementation"])
    return kwargs


# ------------------------------------------------------------------ placement
@dataclass(frozen=True)
class Placement:
    """Where to put the model: one ``device``, or a ``device_map`` spreading it; ``reason`` says why."""

    device: str | None
    device_map: str | None
    reason: str


def choose_placement(model_bytes: int | None, accelerator: str | None, free_memory: list[int],
                     headroom: float = 1.2) -> Placement:
    """Pick a placement for a model of ``model_bytes`` given each accelerator's free memory.

    One accelerator when the model (times ``headroom`` for activations and the KV cache) fits on the
    first; ``device_map="auto"`` across all of them when it does not; the CPU when there is none.

    Example:
        >>> choose_placement(14 * 2**30, "cuda", [80 * 2**30]).device
        'cuda:0'
        >>> choose_placement(140 * 2**30, "cuda", [80 * 2**30, 80 * 2**30]).device_map
        'auto'
    """
    if accelerator is None or not free_memory:
        return Placement("cpu", None, "no GPU found")
    gib = 2**30
    if accelerator == "mps":
        return Placement("mps", None, "Apple GPU (MPS) found")
    if model_bytes is None:
        return Placement(f"{accelerator}:0", None, "GPU found (model size unknown)")
    needed = model_bytes * headroom
    if needed <= free_memory[0]:
        return Placement(f"{accelerator}:0", None,
                         f"the model ({model_bytes / gib:.1f} GiB) fits on one GPU "
                         f"({free_memory[0] / gib:.1f} GiB free)")
    total = sum(free_memory)
    if len(free_memory) > 1:
        tail = "fits across them" if needed <= total else "does not fit even across them: the rest is offloaded to CPU"
        return Placement(None, "auto", f"the model ({model_bytes / gib:.1f} GiB) does not fit on one GPU "
                                       f"({free_memory[0] / gib:.1f} GiB free) but {len(free_memory)} GPUs "
                                       f"have {total / gib:.1f} GiB free; it {tail}")
    return Placement(None, "auto", f"the model ({model_bytes / gib:.1f} GiB) does not fit on the GPU "
                                   f"({free_memory[0] / gib:.1f} GiB free): layers that do not fit are offloaded "
                                   "to CPU memory (slow)")


def accelerator_memory() -> tuple[str | None, list[int]]:
    """The accelerator type of this machine and each device's free memory in bytes."""
    if torch.cuda.is_available():
        return "cuda", [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", [0]
    return None, []


def estimate_model_bytes(model_cls, config, kwargs: dict[str, Any]) -> int | None:
    """The weights' size in the dtype they will load in, from an empty (meta-device) model."""
    try:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = model_cls.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
        numel = sum(p.numel() for p in model.parameters())
    except Exception as err:  # noqa: BLE001 - an estimate; remote code may not build on the meta device
        logger.debug("Could not estimate the model size: %s", err)
        return None
    method = model_quantization(kwargs, config)
    quantization = kwargs.get("quantization_config")
    if method == "bitsandbytes" and getattr(quantization, "load_in_4bit", False):
        return numel // 2
    if method == "bitsandbytes":
        return numel
    dtype = kwargs.get("dtype", "auto")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
    return numel * itemsize


# ------------------------------------------------------------------ LoRA
def attach_lora(model, lora_weights: str, merge: bool, quantized: bool, **kwargs: Any):
    """Load a PEFT LoRA adapter onto ``model``; merge it into the weights unless told not to or quantized."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("lora_weights needs the peft package: pip install -e '.[lora]' in a clone of "
                          "simple-generation.") from err
    adapter_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder") if k in kwargs}
    try:
        peft_model = PeftModel.from_pretrained(model, str(lora_weights), **adapter_kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the LoRA adapter {lora_weights!r}: pass a folder saved with peft's "
                             f"save_pretrained (adapter_config.json + weights) or its hub id. ({err})") from err
    peft_model.eval()
    if merge and not quantized:
        return peft_model.merge_and_unload(), "merged"
    if merge and quantized:
        logger.info("LoRA kept as a separate adapter: merging into quantized weights would lose precision.")
    return peft_model, "separate"


# ------------------------------------------------------------------ compile
def enable_compile(model, device_type: str) -> None:
    """Static KV cache + ``torch.compile`` of the decoding step, through transformers' own auto-compile."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead" if device_type == "cuda" else "default")
    if device_type not in ("cuda", "xpu"):
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told so
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config
