"""Hand-built generation parameters for the engine tests (the façade builds them in real calls)."""

from transformers import GenerationConfig

from simple_generation.requests import GenerationParams


def make_params(**config) -> GenerationParams:
    """Parameters from GenerationConfig fields; equal settings give equal fingerprints."""
    fingerprint = repr(sorted(config.items()))
    return GenerationParams(config=GenerationConfig(**config), call_kwargs={}, stop_strings=(), seed=None,
                            fingerprint=fingerprint, batch_key=fingerprint)
