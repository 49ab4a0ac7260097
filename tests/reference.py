"""HF's own unbatched generation: the reference every batched answer must equal."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


def load_reference(path):
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def hf_greedy(path, prompts, max_new_tokens, model_and_tokenizer=None, **kwargs):
    """One `model.generate` call per prompt, no padding; returns the decoded continuations."""
    model, tokenizer = model_and_tokenizer or load_reference(path)
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        new = output[0] if model.config.is_encoder_decoder else output[0, inputs["input_ids"].shape[1]:]
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers
