"""Turn user prompts (or conversations) into the text the model is fed. Stub: filled in by issue 3."""

from __future__ import annotations

from typing import Any


class PromptFormatter:
    """Plain prompts pass through unchanged."""

    def __init__(self, tokenizer, template: str | None = None, system_message: str | None = None,
                 apply_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.template = template
        self.system_message = system_message
        self.apply_chat_template = apply_chat_template
        self.stop_strings: list[str] = []
        self.stop_token_ids: list[int] = []

    def format(self, inputs: list[Any]) -> list[str]:
        return list(inputs)

    @property
    def add_special_tokens(self) -> bool:
        return True
