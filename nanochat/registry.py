"""One way to choose an implementation by name, for every kind of choice: loss backends (--kernel),
attention backends (--attn), decode attentions (--attention), fp8 recipes (--fp8_recipe) and model
architectures (--arch).

A choice is an object with a `name`, `is_available() -> (bool, reason)` (are its package and hardware
here? the reason names the fix) and `supports(...)` (may it serve this case? the arguments are the
kind's: a layer's window, dtype and device for attention). Each kind keeps one `Registry`: a dict
name -> choice whose order is auto's preference. The registry owns what every kind needs alike: the
error for an unknown name, old names (aliases), the flag's help text, the availability table and
auto's pick. Adding a backend: one class, one line in its kind's registry.
"""
from __future__ import annotations

import importlib.util
from typing import Iterable

import torch

from nanochat.common import log0


class BackendUnavailable(RuntimeError):
    """A known choice whose package or hardware is missing; the message names the fix."""


class Backend:
    """A registered choice that needs nothing and serves every case until a subclass says otherwise."""

    name: str = ""
    summary: str = ""  # a few words for the flag's help text

    def is_available(self) -> tuple[bool, str]:
        return True, "ok"

    def supports(self, *case) -> bool:
        return True


def package_status(module: str, package: str, hint: str, *, cuda: bool = False) -> tuple[bool, str]:
    """is_available() of a choice built on an optional package: `module` must be importable (found, not
    imported: some take seconds) and, with cuda=True, a GPU visible; the reason names `hint`, the fix."""
    if importlib.util.find_spec(module) is None:
        return False, f"{package} is not installed: {hint}"
    if cuda and not torch.cuda.is_available():
        return False, f"{package} needs a CUDA GPU and none is visible (on a GPU machine: {hint})"
    return True, "ok"


class Registry(dict):
    """name -> choice, in auto's order of preference. `auto=True`: the kind also takes the name "auto"
    (its callers pick per case with `pick`); `aliases`: old name -> name, accepted and logged."""

    def __init__(self, kind: str, flag: str, choices: Iterable[Backend], *, auto: bool = False,
                 aliases: dict[str, str] | None = None) -> None:
        super().__init__((c.name, c) for c in choices)
        self.kind, self.flag, self.auto, self.aliases = kind, flag, auto, dict(aliases or {})

    def names(self) -> list[str]:
        """Every name a flag takes: "auto" first when the kind has it."""
        return ["auto", *self] if self.auto else list(self)

    def canonical(self, name: str) -> str:
        """`name` itself, or the name an alias stands for (logged); ValueError naming the choices otherwise."""
        if name in self.aliases:
            log0(f"{self.kind} {name!r} is an old name of {self.aliases[name]!r}: using {self.aliases[name]}")
            return self.aliases[name]
        if name in self.names():
            return name
        raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())} ({self.flag})")

    def require(self, name: str) -> Backend:
        """The available choice `name` (or alias): ValueError if unknown, BackendUnavailable naming why not here."""
        choice = self[self.canonical(name)]
        ok, reason = choice.is_available()
        if not ok:
            raise BackendUnavailable(f"{self.kind} {choice.name!r} unavailable: {reason}")
        return choice

    def available(self) -> dict[str, tuple[bool, str]]:
        """Every choice -> (available, reason it is not, or 'ok'); an error while checking is a reason, not a crash."""
        table = {}
        for name, choice in self.items():
            try:
                table[name] = choice.is_available()
            except Exception as exc:  # noqa: BLE001 -- a broken optional package is a reason
                table[name] = (False, f"{type(exc).__name__}: {exc}")
        return table

    def pick(self, *case, order: Iterable[str] | None = None) -> str | None:
        """auto: the first choice (in `order`, default the registry's) that supports `case` and is
        available, or None. Support is asked first: no availability probe where a choice could not serve."""
        return next((name for name in (order or self)
                     if self[name].supports(*case) and self[name].is_available()[0]), None)

    def help(self) -> str:
        """The flag's help text: the kind, then each name with its summary and old names."""
        def one(name: str) -> str:
            notes = [self[name].summary] if self[name].summary else []
            notes += [f"old name: {old}" for old, new in self.aliases.items() if new == name]
            return f"{name} ({'; '.join(notes)})" if notes else name
        auto = ["auto (the first that serves, in this order)"] if self.auto else []
        return f"{self.kind}: " + ", ".join(auto + [one(name) for name in self])
