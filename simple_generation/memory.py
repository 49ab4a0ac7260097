"""Memory of a call: its peak (RSS on the CPU, allocated memory on CUDA devices) and what a KV cache may use.

Example:
    >>> with PeakMemory() as peak:           # doctest: +SKIP
    ...     gen(prompts)
    >>> peak.rss_mb, peak.cuda_mb            # doctest: +SKIP
"""

from __future__ import annotations

import resource
import sys
from typing import Any

_CLEAR_REFS = "/proc/self/clear_refs"


def _rss_high_water_mb() -> float | None:
    """The process's peak RSS since the last reset (Linux ``VmHWM``), or the lifetime peak elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _reset_rss_high_water() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: writing 5 to clear_refs); False where that fails."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Measures the peak memory of a block: process RSS (MB) and, with CUDA, the peak allocated on all devices.

    On Linux the RSS peak is the block's own (the kernel's high-water mark is reset on entry); elsewhere it
    is the process's peak so far. Only one measurement should run at a time in a process.
    """

    def __init__(self):
        self.rss_mb: float | None = None
        self.cuda_mb: float | None = None
        self.rss_is_lifetime = False

    def __enter__(self) -> PeakMemory:
        self.rss_is_lifetime = not _reset_rss_high_water()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rss_mb = _rss_high_water_mb()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_mb = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: Any) -> int:
    """Memory a new allocation can take on ``device``: free CUDA memory, or the machine's available RAM."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = available_memory_bytes()
    if available is not None:
        return available
    import psutil  # where /proc/meminfo is missing (psutil comes with accelerate)

    return int(psutil.virtual_memory().available)


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes one token's keys and values take in every layer of a decoder (from its config)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        return next((getattr(text, n) for n in names if getattr(text, n, None)), None)

    layers = first("num_hidden_layers", "n_layer", "num_layers") or 1
    heads = first("num_attention_heads", "n_head", "num_heads") or 1
    hidden = first("hidden_size", "n_embd", "d_model") or heads
    kv_heads = 1 if getattr(text, "multi_query", False) else (first("num_key_value_heads") or heads)
    head_dim = first("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * element_size
