"""Helpers shared by the engine tests: hand-built parameters (the façade builds them in real calls) and a
run that checks every request comes back exactly once."""

from transformers import GenerationConfig

from simple_generation.requests import GenerationParams


def make_params(**config) -> GenerationParams:
    """Parameters from GenerationConfig fields; equal settings give equal fingerprints."""
    fingerprint = repr(sorted(config.items()))
    return GenerationParams(config=GenerationConfig(**config), call_kwargs={}, stop_strings=(), seed=None,
                            fingerprint=fingerprint, batch_key=fingerprint)


def run_all(engine, requests, **kwargs):
    """``{request id: output}`` of one engine run; each request must come back exactly once."""
    outputs = {}
    for request, output in engine.run(requests, **kwargs):
        assert request.id not in outputs, "a request came back twice"
        outputs[request.id] = output
    assert sorted(outputs) == sorted(r.id for r in requests)
    return outputs


def trim_eos(ids, eos):
    """``ids`` up to and including the first ``eos``."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids
