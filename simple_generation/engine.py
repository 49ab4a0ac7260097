"""Run one padded batch through ``model.generate`` and return the new tokens of each sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


class HFEngine:
    """Batched generation with transformers' own ``generate``.

    ``generate_batch`` takes token id lists (unpadded) and returns, for each prompt, the list of its
    ``num_return_sequences`` generated token id lists (prompt and padding removed).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder

    @property
    def input_device(self) -> torch.device:
        """Where the inputs go: the input embeddings' device (the first layer's, with a device_map)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is None:
            return self.model.device
        # accelerate's offload hooks run the layer elsewhere than where its (meta) weights sit
        hook = getattr(embeddings, "_hf_hook", None)
        execution_device = getattr(hook, "execution_device", None)
        if execution_device is not None:
            return torch.device(execution_device)
        device = embeddings.weight.device
        return device if device.type != "meta" else torch.device("cpu")

    def pad(self, token_ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in token_ids)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        # left padding for decoder-only models, right padding for encoders (see load_tokenizer)
        right = self.is_encoder_decoder
        for row, ids in enumerate(token_ids):
            if ids:
                span = slice(0, len(ids)) if right else slice(width - len(ids), width)
                input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, span] = 1
        device = self.input_device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    @torch.inference_mode()
    def generate_batch(
        self,
        token_ids: Sequence[list[int]],
        generation_config: GenerationConfig,
        call_kwargs: dict[str, Any],
    ) -> list[list[list[int]]]:
        inputs = self.pad(token_ids)
        output = self.model.generate(**inputs, generation_config=generation_config, **call_kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences if self.is_encoder_decoder else sequences[:, inputs["input_ids"].shape[1]:]
        new_tokens = new_tokens.tolist()
        per_prompt = len(new_tokens) // len(token_ids)
        return [new_tokens[i * per_prompt:(i + 1) * per_prompt] for i in range(len(token_ids))]
