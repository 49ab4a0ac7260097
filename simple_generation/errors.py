"""Every exception simple-generation raises, in one place (torch-free: the CLI imports it first).

Most derive from :class:`SimpleGenerationError` and from the built-in exception callers caught before
this module existed (``StoreError`` is still a ``ValueError``, ``BatchGenerationError`` a
``RuntimeError``, ``ModelLoadError`` an ``OSError``), so ``except ValueError`` keeps working.
Interruptions derive from ``KeyboardInterrupt`` only: an ``except Exception`` must not swallow Ctrl-C.

Example:
    >>> from simple_generation.errors import SimpleGenerationError, StoreError
    >>> issubclass(StoreError, SimpleGenerationError) and issubclass(StoreError, ValueError)
    True
"""

from __future__ import annotations

from collections.abc import Sequence


class SimpleGenerationError(Exception):
    """Base class of the package's errors (interruptions aside: they are ``KeyboardInterrupt``)."""


# ---------------------------------------------------------------------------------------------- loading
class ModelLoadError(SimpleGenerationError, OSError):
    """The model or tokenizer could not be found or loaded."""


# ---------------------------------------------------------------------------------------------- inputs
class UsageError(SimpleGenerationError):
    """A wrong command-line argument: one line on stderr, exit code 2, nothing loaded."""


class InputError(SimpleGenerationError, ValueError):
    """An input file or record that cannot be used; the message starts with ``file:line:``."""


class ImageError(InputError):
    """An image that cannot be used: a missing file, data that is not a decodable image, a remote URL while
    remote images are off, a failed fetch. The message starts with where the image was given (e.g.
    ``texts[3], image 1:`` or ``file:line:``). An ``InputError``, so a ``ValueError``."""


class LanguageError(SimpleGenerationError, ValueError):
    """A language that cannot be resolved, or that the translation model does not have; ``closest`` lists the
    model's nearest codes (raised before any generation)."""

    def __init__(self, message: str, requested: object = None, closest: Sequence[str] = ()):
        super().__init__(message)
        self.requested = requested
        self.closest = list(closest)


class StoreError(SimpleGenerationError, ValueError):
    """A file that cannot be used as a store (not SQLite, corrupt, another program's database, another schema)."""


# ---------------------------------------------------------------------------------------------- engines
class NoEngineError(SimpleGenerationError, ValueError):
    """No engine of the generator supports a call's parameters; the message gives each engine's reason."""


# ---------------------------------------------------------------------------------------------- generation
class BatchFailed(SimpleGenerationError):
    """Internal: an engine's batch failed (ids of its requests, the cause); the pipeline turns it into a
    :class:`BatchGenerationError` naming the prompts."""

    def __init__(self, request_ids: Sequence[int], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = list(request_ids)
        self.cause = cause


class BatchGenerationError(SimpleGenerationError, RuntimeError):
    """Generation failed for one batch. ``partial`` maps prompt index to the answers already finished."""

    def __init__(self, message: str, indices: Sequence[int], partial: dict[int, object]):
        super().__init__(message)
        self.indices = list(indices)
        self.partial = partial


class DistributedGenerationError(BatchGenerationError):
    """Generation failed on one or more processes; raised on **every** process.

    ``failed_ranks`` maps each failing rank to its error (``"Type: message"``). As for
    :class:`BatchGenerationError`, ``partial`` holds every answer finished anywhere and ``indices`` the
    prompts of the batches that failed.
    """

    def __init__(self, message: str, indices: Sequence[int], partial: dict[int, object],
                 failed_ranks: dict[int, str]):
        super().__init__(message, indices, partial)
        self.failed_ranks = dict(failed_ranks)


# ---------------------------------------------------------------------------------------------- interruptions
class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a call. ``partial`` maps prompt index to the answers already finished (and stored)."""

    def __init__(self, message: str, partial: dict[int, object]):
        super().__init__(message)
        self.partial = partial


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption so that the CLI closes its output, the store and the stdin
    copy as after Ctrl-C (exit code 143)."""


__all__ = [
    "BatchFailed", "BatchGenerationError", "DistributedGenerationError", "GenerationInterrupted", "ImageError",
    "InputError", "LanguageError", "ModelLoadError", "NoEngineError", "SimpleGenerationError", "StoreError",
    "Terminated", "UsageError",
]
