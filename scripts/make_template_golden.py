"""Regenerate the template data and the golden prompts from the real FastChat package.

FastChat is not a dependency of simple-generation: its templates are stored as data in
``simple_generation/templates/fastchat_templates.json`` and rendered by our own renderer. This script
reads both the data and the expected prompts from ``fschat==0.2.36`` itself. ``fastchat.conversation``
imports only the standard library, so a throwaway environment without FastChat's dependencies works:

    python -m venv /tmp/fschat-venv
    /tmp/fschat-venv/bin/pip install fschat==0.2.36 --no-deps
    /tmp/fschat-venv/bin/python scripts/make_template_golden.py

It writes ``simple_generation/templates/fastchat_templates.json`` (every registered template, as data) and
``tests/data/template_golden.json`` (every template x every conversation below -> FastChat's prompt).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastchat import __version__ as fastchat_version
from fastchat.conversation import conv_templates, get_conv_template

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "simple_generation" / "templates" / "fastchat_templates.json"
GOLDEN = ROOT / "tests" / "data" / "template_golden.json"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "single_turn": [_user("Tell me what's 2 + 2.")],
    "multi_turn": [_user("Hi!"), _assistant("Hello! How can I help?"), _user("What is 2 + 2?"),
                   _assistant("2 + 2 = 4."), _user("And times 3?")],
    "system_message": [{"role": "system", "content": "You are a pirate. Answer like one."},
                       _user("Where is the treasure?")],
    "empty_system_message": [{"role": "system", "content": ""}, _user("Hi")],
    "system_multi_turn": [{"role": "system", "content": "Be brief."}, _user("Name a color."), _assistant("Blue."),
                          _user("Another one.")],
    "unicode_and_newlines": [_user("caffè, naïve, 你好 🙂\nline two\n\nline four"),
                             _assistant("Réponse : d'accord.\r\nFin\n\n— ok"), _user("ünïcödé\ttab  and  spaces ")],
    "ends_with_assistant": [_user("Say yes."), _assistant("Yes.")],
    "empty_answer_in_history": [_user("First?"), _assistant(""), _user("Second?")],
}


def template_data(conv) -> dict:
    return {
        "name": conv.name,
        "system_template": conv.system_template,
        "system_message": conv.system_message,
        "roles": list(conv.roles),
        "messages": [[role, message] for role, message in conv.messages],
        "offset": conv.offset,
        "sep_style": conv.sep_style.name if conv.sep_style is not None else None,
        "sep": conv.sep,
        "sep2": conv.sep2,
        "stop_str": conv.stop_str,
        "stop_token_ids": list(conv.stop_token_ids) if conv.stop_token_ids else None,
        # FastChat numbers ChatGLM rounds from 1 for chatglm2 only (it decides by name)
        "round_start": 1 if conv.name == "chatglm2" else 0,
    }


def fastchat_prompt(name: str, messages: list[dict]) -> str:
    conv = get_conv_template(name)
    if messages and messages[0]["role"] == "system":
        conv.set_system_message(messages[0]["content"])
        messages = messages[1:]
    for message in messages:
        conv.append_message(conv.roles[0 if message["role"] == "user" else 1], message["content"])
    if messages and messages[-1]["role"] == "user":
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def main() -> None:
    names = sorted(conv_templates)
    DATA.write_text(json.dumps({"fastchat_version": fastchat_version,
                                "templates": [template_data(conv_templates[n]) for n in names]},
                               indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    prompts: dict[str, dict[str, str]] = {}
    failures: dict[str, str] = {}
    for name in names:
        for key, messages in CONVERSATIONS.items():
            try:
                prompts.setdefault(name, {})[key] = fastchat_prompt(name, messages)
            except Exception as err:  # noqa: BLE001 - recorded: FastChat cannot render API-only templates
                failures[name] = f"{type(err).__name__}: {err}"
                prompts.pop(name, None)
                break
    GOLDEN.write_text(json.dumps({"fastchat_version": fastchat_version, "conversations": CONVERSATIONS,
                                  "prompts": prompts, "fastchat_fails": failures},
                                 indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(names)} templates ({len(failures)} without a text prompt in FastChat: {sorted(failures)}); "
          f"{sum(len(p) for p in prompts.values())} golden prompts")


if __name__ == "__main__":
    main()
