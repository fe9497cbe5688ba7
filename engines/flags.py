"""Command-line flags made from pydantic settings models: one ``--kebab-case`` flag per field.

A field marked ``json_schema_extra={"nargs": "+"}`` takes one or more values after its flag
(``--lora-modules a=/p b=/q``, as vLLM's ``nargs="+"`` flags do); any other field takes one value
(a ``list[str]`` field given as one string is the model's to split, as ``extra_args`` does).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One ``--kebab-case`` flag per field of a pydantic model, typed and documented."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        annotation = field.annotation
        choices, base = _flag_type(annotation)
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif _takes_several(field):
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar=name.upper(), help=help_text)
        else:
            parser.add_argument(
                flag,
                dest=name,
                type=base,
                choices=choices,
                default=None,
                metavar=None if choices else name.upper(),
                help=help_text,
            )


def _takes_several(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("nargs") == "+"


def _flag_type(annotation: Any) -> tuple[list[Any] | None, Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        return _flag_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation)), str
    return None, annotation if annotation in (int, float, bool) else str


def model_from_args(model: type[BaseModel], args: argparse.Namespace, config_file: str | None) -> Any:
    overrides = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    if config_file:
        return model.from_yaml(config_file, **overrides)  # type: ignore[attr-defined]
    return model.model_validate(overrides)
