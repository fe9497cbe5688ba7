"""A model's own Jinja chat template, rendered the way Hugging Face ``transformers`` does.

The gateway hashes the tokens an engine will compute, so for chat requests it must render the
prompt with the same template the engine uses (vLLM and SGLang render the model's
``chat_template`` from ``tokenizer_config.json`` or ``chat_template.jinja``). The environment
matches ``transformers``: a sandbox, ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now``, and a ``tojson`` that keeps non-ASCII text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """The template is invalid, or it rejected the messages (``raise_exception``)."""


def find_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The default template of a tokenizer directory, or ``None`` when it has none."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        template = json.loads(json_file.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """One compiled template; :meth:`render` gives the prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]) -> None:
        try:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("a model's chat template needs `pip install jinja2` (pdgate[hf])") from exc
        self._template_error = TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from None
        self._special = special_tokens

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        context = {
            **self._special,
            **kwargs,
            "messages": list(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**context)
        except ChatTemplateError:
            raise
        except (self._template_error, TypeError, KeyError, AttributeError) as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
