"""What a batch job does unless told otherwise: one place for the command line's ``run`` and the web app's
batch tab (no torch, no transformers: cheap to import).

The Python API keeps its own defaults (:class:`~simple_generation.config.DefaultGenerationConfig`: sampling at
temperature 0.7, the prompt echoed, as the original project's ``gen(...)`` did). A batch job over a file is
usually an evaluation or a dataset build, where a rerun should give the same answers and the output should
hold the answers only: greedy decoding, the continuation only.

Example:
    >>> from simple_generation.defaults import BATCH_DEFAULTS
    >>> BATCH_DEFAULTS.temperature, BATCH_DEFAULTS.skip_prompt
    (0.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass

# The library's sampling settings (DefaultGenerationConfig uses them; --help shows them without importing it).
LIBRARY_TOP_P = 1.0
LIBRARY_TOP_K = 50
LIBRARY_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class BatchDefaults:
    """Defaults of a batch job (``simple-generation run``, the web app's batch tab)."""

    max_new_tokens: int = LIBRARY_MAX_NEW_TOKENS  # capped to the room left in the model's context
    temperature: float = 0.0                      # greedy; a temperature > 0 samples
    skip_prompt: bool = True                      # the answer holds the continuation only
    top_p: float = LIBRARY_TOP_P                  # used only when sampling
    top_k: int = LIBRARY_TOP_K                    # used only when sampling


BATCH_DEFAULTS = BatchDefaults()
