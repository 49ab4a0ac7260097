"""The original project's import path for image-text generation: ``from simple_generation.vlm import
SimpleVLMGenerator`` (the same class as ``simple_generation.SimpleVLMGenerator``)."""

from .generator import SimpleVLMGenerator

__all__ = ["SimpleVLMGenerator"]
