"""Multi-turn conversations built from fixed user prompts (``SimpleGenerator.conversation_from_user_prompts``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .formatting import plain_transcript
from .templates import render_conversation


@dataclass
class Conversation:
    """The turns of one conversation, as role/content messages.

    ``str(conversation)`` is the rendered transcript: the active named template's prompt with every
    answer in it (as FastChat renders a finished conversation), the tokenizer's chat template, or
    plain ``User:``/``Assistant:`` lines when the generator has neither.

    Example:
        >>> conversation = gen.conversation_from_user_prompts(["Hi!", "What is 2 + 2?"])   # doctest: +SKIP
        >>> conversation.messages[1]["role"]                                               # doctest: +SKIP
        'assistant'
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    template: Any | None = None
    system_message: str | None = None
    tokenizer: object | None = field(default=None, repr=False)

    @property
    def answers(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    def __str__(self) -> str:
        if self.template is not None:
            return render_conversation(self.template, self.messages, self.system_message)
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            messages = self.messages
            if self.system_message is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_message}] + messages
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return plain_transcript(self.messages, add_generation_prompt=False)

