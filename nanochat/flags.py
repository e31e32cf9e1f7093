"""One flag parser for every script: a dataclass of defaults becomes an argparse CLI.

Each field `foo_bar` is accepted as `--foo_bar` and `--foo-bar`, with `=value` or a separate value.
Booleans also take `--flag` / `--no-flag`. `list[...]` fields take comma-separated values.
A field's help text is its `metadata["help"]`; `--help` adds the default unless the text already says it
(or the default is "", which the text explains: off, none, automatic).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {text!r}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _converter(tp: Any) -> Callable[[str], Any]:
    """The argparse `type` for a field annotation: scalars, bools, comma lists, and `none` for `X | None`.
    Its __name__ is what argparse's error shows: "invalid int value: 'four'"."""
    inner, optional = _strip_optional(tp)
    is_list = typing.get_origin(inner) is list
    elem = typing.get_args(inner)[0] if is_list else inner
    parse_one = _parse_bool if elem is bool else elem

    def conv(text: str):
        if optional and text.lower() == "none":
            return None
        if is_list:
            return [parse_one(part) for part in text.split(",") if part != ""]
        return parse_one(text)

    name = getattr(elem, "__name__", str(elem))
    conv.__name__ = f"comma-separated {name} list" if is_list else name
    return conv


def build_parser(config_cls: type, description: str | None = None,
                 aliases: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """`aliases` maps extra flag names to field names: short forms such as {"-i": "source"} (nanochat's
    `-i sft`) and old spellings kept working, such as {"--tag": "model_tag"}."""
    unknown = set((aliases or {}).values()) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"flag aliases name unknown fields {sorted(unknown)} of {config_cls.__name__}")
    parser = argparse.ArgumentParser(description=description or config_cls.__doc__)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        tp = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        names = [flag for flag, name in (aliases or {}).items() if name == field.name] + [f"--{field.name}"]
        if "_" in field.name:
            names.append(f"--{field.name.replace('_', '-')}")
        help_text = field.metadata.get("help", "")
        if "default" not in help_text and default != "":  # an empty default is off/none, which the help says
            help_text = f"{help_text} (default: {default})".lstrip()
        if _strip_optional(tp)[0] is bool:
            parser.add_argument(*names, dest=field.name, type=_parse_bool, nargs="?", const=True,
                                default=default, help=help_text)
            negs = [f"--no-{field.name.replace('_', '-')}"]
            if "_" in field.name:
                negs.append(f"--no_{field.name}")
            parser.add_argument(*negs, dest=field.name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=field.name, type=_converter(tp), default=default, help=help_text)
    return parser


def parse_flags(config_cls: type[T], argv: list[str] | None = None, description: str | None = None,
                aliases: dict[str, str] | None = None) -> T:
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `config_cls`."""
    args = build_parser(config_cls, description, aliases).parse_args(argv)
    return config_cls(**vars(args))
