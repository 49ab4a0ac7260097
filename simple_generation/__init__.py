"""simple-generation: batched, ordered, exact text generation over HuggingFace checkpoints."""

from .config import DefaultGenerationConfig
from .distributed import DistributedGenerationError
from .generator import SimpleGenerator
from .loading import ModelLoadError
from .logs import setup_library_logger
from .results import GenerationResult, RunSummary
from .scheduling import BatchGenerationError, GenerationInterrupted
from .store import ResultStore
from .templates import available_system_prompts, render_conversation

__all__ = [
    "BatchGenerationError",
    "DefaultGenerationConfig",
    "DistributedGenerationError",
    "GenerationInterrupted",
    "GenerationResult",
    "ModelLoadError",
    "ResultStore",
    "RunSummary",
    "SimpleGenerator",
    "available_system_prompts",
    "render_conversation",
]
__version__ = "0.3.0"

setup_library_logger()
