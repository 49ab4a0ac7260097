"""Helpers shared by the engine tests: hand-built parameters (the façade builds them in real calls) and a
run that checks every request comes back exactly once."""

from transformers import GenerationConfig

from simple_generation.engines.base import EngineBase, EngineStats
from simple_generation.requests import EngineOutput, GenerationParams


def make_params(**config) -> GenerationParams:
    """Parameters from GenerationConfig fields; equal settings give equal fingerprints."""
    fingerprint = repr(sorted(config.items()))
    return GenerationParams(config=GenerationConfig(**config), call_kwargs={}, stop_strings=(), seed=None,
                            fingerprint=fingerprint, batch_key=fingerprint)


def engine_context(path, **engine_kwargs):
    """What the façade hands an engine class for the checkpoint at ``path`` (causal, loaded by the engine)."""
    from transformers import AutoConfig, AutoTokenizer

    from simple_generation.engines.base import EngineContext

    return EngineContext(model_name_or_path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                         config=AutoConfig.from_pretrained(path), is_encoder_decoder=False,
                         engine_kwargs=engine_kwargs)


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


def tokenized_prompts(path):
    """The test prompts as token ids of the checkpoint's tokenizer (no template)."""
    from transformers import AutoTokenizer

    from .prompts import PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def fp32_model(path):
    """The checkpoint as an HF fp32 model in eval mode: the reference for exact greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def static_answers(path, prompts, **kwargs):
    """Greedy answers (continuations) of the HF static engine: what a fast engine must match in fp32."""
    from simple_generation import SimpleGenerator

    generator = SimpleGenerator(path, engine="static", track_emissions=False, **kwargs)
    return generator(prompts, max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)


_TWO_PROCESS_SCRIPT = """
import json, os, sys
from simple_generation import SimpleGenerator
from tests.prompts import PROMPTS

path, out, engine, engine_kwargs = sys.argv[1:5]
gen = SimpleGenerator(path, engine=engine, track_emissions=False, **json.loads(engine_kwargs))
answers = gen(PROMPTS, max_new_tokens=8, temperature=0, skip_prompt=True, show_progress_bar=False)
with open(os.path.join(out, f"rank{gen.distribution.rank}.json"), "w") as handle:
    json.dump({"world_size": gen.distribution.world_size, "answers": answers, "engine": gen.last_run.engine}, handle)
"""


def two_process_records(path, out_dir, engine, **engine_kwargs) -> list[dict]:
    """Run one greedy call over the test prompts in two real `accelerate launch` processes (gloo on the
    CPU), each building its own generator with ``engine``; what each rank got, by rank."""
    import json
    import subprocess

    from .test_distributed import ROOT, _env, _free_port, _launch_command

    script = out_dir / "two_processes.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    command = _launch_command(2, _free_port(), "--num_machines", "1", str(script), path, str(out_dir), engine,
                              json.dumps(engine_kwargs))
    done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


# ---------------------------------------------------------------------------------------------- small real engines
# Engines without a model, for tests of routing and planning (which engine runs a call, which keys it uses);
# registered under a name for a test with ``monkeypatch.setitem(REGISTRY, name, "tests.engine_helpers:Class")``.


class EchoEngine(EngineBase):
    """An HF-family engine that answers each request with its prompt's last token, up to its budget."""

    name = "echo"
    needs_hf_model = True
    supports_beam_search = True
    supports_generate_kwargs = True

    def __init__(self, received_kwargs=None):
        self.stats = EngineStats()
        self.received_kwargs = dict(received_kwargs or {})  # the engine keywords it was created with

    @classmethod
    def create(cls, context):
        return cls(context.engine_kwargs)

    def run(self, requests, *, isolate_errors=False):
        for request in requests:
            n = request.params.num_return_sequences
            yield request, EngineOutput(sequences=[[request.token_ids[-1]] * request.max_new_tokens] * n,
                                        finish_reasons=["length"] * n)


class GreedyOnlyEngine(EchoEngine):
    """An HF-family engine that refuses sampled calls (the router must fall back past it)."""

    name = "greedy-only"

    def unsupported(self, params):
        return "it decodes greedily only" if params.sampled else None


class QuickEngine(EchoEngine):
    """A fast engine with its own runtime (family "quick") that starts; counts its starts."""

    name = "quick"
    needs_hf_model = False
    starts = 0

    @classmethod
    def create(cls, context):
        QuickEngine.starts += 1
        return cls(context.engine_kwargs)


class BrokenEngine(QuickEngine):
    """A fast engine that fails to start (family "broken")."""

    name = "broken"

    @classmethod
    def create(cls, context):
        raise RuntimeError("no runtime here")


# feature: beam search
def frequent_token(hf_model, prompt_ids) -> int:
    """A token the tiny model's beams often produce: as EOS, beams finish at different lengths and steps."""
    import torch

    counts: dict[int, int] = {}
    for ids in prompt_ids[:6]:
        ids = torch.tensor([ids])
        rows = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 num_beams=4, num_return_sequences=4)
        for token in rows[:, ids.shape[1]:].flatten().tolist():
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=counts.get)


def assert_beams_equal_hf(engine, prompt_ids, hf_model, settings, *, max_new_tokens: int, budget_step: int) -> None:
    """An engine's beam search equals HF's unbatched ``generate(num_beams=3, num_return_sequences=2)``, best
    first, on 8 prompts with per-request budgets (every other one ``budget_step`` shorter) and an EOS the beams
    often meet, so they finish at different lengths and steps."""
    import torch

    from simple_generation.requests import Request

    eos = frequent_token(hf_model, prompt_ids)
    params = make_params(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, **settings)
    assert engine.unsupported(params) is None
    requests = [Request(id=i, token_ids=ids, params=params, max_new_tokens=max_new_tokens - budget_step * (i % 2))
                for i, ids in enumerate(prompt_ids[:8])]
    outputs = run_all(engine, requests)
    finished_early = 0
    for request in requests:
        ids = torch.tensor([request.token_ids])
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_new_tokens,
                                      do_sample=False, num_beams=3, num_return_sequences=2, eos_token_id=eos,
                                      pad_token_id=0, **settings)
        expected = [trim_eos(row[len(request.token_ids):].tolist(), eos) for row in generated]
        assert [trim_eos(s, eos) for s in outputs[request.id].sequences] == expected, f"prompt {request.id}"
        finished_early += sum(eos in s for s in outputs[request.id].sequences)
    if settings.get("length_penalty", 1.0) <= 1.0:  # (2.0 favours the long beams: those run to the budget)
        assert finished_early  # the EOS paths were exercised
