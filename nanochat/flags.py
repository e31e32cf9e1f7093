"""One flag parser for every script: a dataclass of defaults becomes an argparse CLI.

Each field `foo_bar` is accepted as `--foo_bar` and `--foo-bar`, with `=value` or a separate value.
Booleans also take `--flag` / `--no-flag`. `list[...]` fields take comma-separated values.
A field's help text is its `metadata["help"]`; `--help` adds the default unless the text already says it
(or the default is "", which the text explains: off, none, automatic).

Scripts share flags by deriving their dataclass from a shared one (nanochat.build.BuildConfig,
nanochat.checkpoint.ModelChoice); `redeclare` gives a shared field another default or makes it a list
(a benchmark axis), and `to_argv` writes a config back as flags for a child process.
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
    """The argparse `type` for a field annotation: scalars, bools, comma lists, and `none` for `X | None` (also
    as an element of `list[X | None]`). Its __name__ is what argparse's error shows: "invalid int value: 'four'"."""
    inner, optional = _strip_optional(tp)
    is_list = typing.get_origin(inner) is list
    elem, elem_optional = _strip_optional(typing.get_args(inner)[0]) if is_list else (inner, False)
    parse_one = _parse_bool if elem is bool else elem

    def parse_element(part: str):
        return None if elem_optional and part.lower() == "none" else parse_one(part)

    def conv(text: str):
        if optional and text.lower() == "none":
            return None
        if is_list:
            return [parse_element(part) for part in text.split(",") if part != ""]
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
            parser.add_argument(*names, dest=field.name, type=_converter(tp), nargs="?", const=True,
                                default=default, help=help_text)
            negs = [f"--no-{field.name.replace('_', '-')}"]
            if "_" in field.name:
                negs.append(f"--no_{field.name}")
            parser.add_argument(*negs, dest=field.name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=field.name, type=_converter(tp), default=default, help=help_text)
    return parser


def redeclare(config_cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """Field `name` of the flags dataclass `config_cls` with another default and the same help (or `help`), for
    a script whose dataclass derives from `config_cls`: `depth: int = redeclare(BuildConfig, "depth", 12)`.
    A list default of a scalar field makes the flag an axis of values: `depth: list[int] = redeclare(..., [20])`."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        raise ValueError(f"{config_cls.__name__} has no field {name!r} to redeclare")
    text = fields[name].metadata.get("help", "") if help is None else help
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def to_argv(config: Any, names: list[str] | None = None) -> list[str]:
    """`--name=value` for the fields `names` (default: all) of a flags dataclass instance, written so that
    parse_flags reads the same values back (None as none, lists comma-separated)."""
    def text(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, list):
            return ",".join(text(v) for v in value)
        return str(value)
    names = [f.name for f in dataclasses.fields(config)] if names is None else names
    return [f"--{name}={text(getattr(config, name))}" for name in names]


def parse_flags(config_cls: type[T], argv: list[str] | None = None, description: str | None = None,
                aliases: dict[str, str] | None = None) -> T:
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `config_cls`."""
    args = build_parser(config_cls, description, aliases).parse_args(argv)
    return config_cls(**vars(args))
