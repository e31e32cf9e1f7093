"""The one selection pattern (nanochat.registry) and the five registries built on it."""
from __future__ import annotations

import pytest
import torch

from nanochat.inference.decoder import DECODE_ATTENTIONS
from nanochat.kernels import LOSS_BACKENDS
from nanochat.kernels.attention import ATTENTION_BACKENDS
from nanochat.model import ARCHITECTURES
from nanochat.precision import FP8_RECIPES
from nanochat.registry import Backend, BackendUnavailable, Registry

REGISTRIES = {"--kernel": LOSS_BACKENDS, "--attn": ATTENTION_BACKENDS, "--attention": DECODE_ATTENTIONS,
              "--fp8_recipe": FP8_RECIPES, "--arch": ARCHITECTURES}


class Probe(Backend):
    """A choice that records the availability probes it gets."""

    def __init__(self, name: str, ok: bool = True, serves: bool = True) -> None:
        self.name, self.ok, self.serves, self.probes = name, ok, serves, 0

    def is_available(self) -> tuple[bool, str]:
        self.probes += 1
        return self.ok, "ok" if self.ok else f"{self.name} needs a package: pip install {self.name}"

    def supports(self, *case) -> bool:
        return self.serves


def test_unknown_name_lists_every_choice_and_the_flag():
    reg = Registry("widget", "--widget", [Probe("a"), Probe("b")], auto=True)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; choose one of: auto, a, b \(--widget\)"):
        reg.canonical("c")
    with pytest.raises(ValueError, match="choose one of: a, b"):
        Registry("widget", "--widget", [Probe("a"), Probe("b")]).require("auto")  # no auto in this kind


def test_an_alias_is_accepted_and_logged(monkeypatch):
    logged = []
    monkeypatch.setattr("nanochat.registry.log0", logged.append)
    reg = Registry("widget", "--widget", [Probe("new")], aliases={"old": "new"})
    assert reg.require("old") is reg["new"]
    assert logged == ["widget 'old' is an old name of 'new': using new"]
    assert "new (old name: old)" in reg.help()


def test_require_names_the_reason_and_available_survives_a_broken_check():
    broken = Probe("broken")
    broken.is_available = lambda: 1 / 0
    reg = Registry("widget", "--widget", [Probe("a", ok=False), broken])
    with pytest.raises(BackendUnavailable, match="widget 'a' unavailable: a needs a package: pip install a"):
        reg.require("a")
    table = reg.available()
    assert table["a"] == (False, "a needs a package: pip install a")
    assert table["broken"][0] is False and "ZeroDivisionError" in table["broken"][1]


def test_pick_takes_the_first_that_serves_and_probes_no_other():
    first, missing, second, never = Probe("first", serves=False), Probe("missing", ok=False), Probe("second"), Probe("x")
    reg = Registry("widget", "--widget", [first, missing, second, never], auto=True)
    assert reg.pick("case") == "second"
    assert (first.probes, missing.probes, never.probes) == (0, 1, 0)  # no probe where it could not serve
    assert reg.pick("case", order=["x", "second"]) == "x"
    assert Registry("widget", "--widget", [Probe("a", serves=False)]).pick() is None


@pytest.mark.parametrize("flag", REGISTRIES)
def test_each_kind_is_one_registry_with_its_help(flag):
    reg = REGISTRIES[flag]
    assert isinstance(reg, Registry) and reg.flag == flag
    for name, choice in reg.items():
        assert isinstance(choice, Backend) and choice.name == name
        ok, reason = choice.is_available()
        assert isinstance(ok, bool) and reason
        assert name in reg.help()


def test_the_flags_help_comes_from_the_registries():
    from scripts.base_train import TrainConfig
    from scripts.chat_web import WebConfig
    helps = {f.name: f.metadata["help"] for cls in (TrainConfig, WebConfig) for f in cls.__dataclass_fields__.values()}
    assert helps["kernel"] == LOSS_BACKENDS.help() and helps["attn"] == ATTENTION_BACKENDS.help()
    assert helps["fp8_recipe"] == FP8_RECIPES.help() and helps["arch"] == ARCHITECTURES.help()
    assert helps["attention"] == DECODE_ATTENTIONS.help()
    assert TrainConfig().kernel == "torch"  # `current` is its old name


def test_loss_backends_say_which_tensors_they_take():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert LOSS_BACKENDS["torch"].supports(torch.float32, cpu)
    assert not LOSS_BACKENDS["cce"].supports(torch.float32, cuda) and LOSS_BACKENDS["cce"].supports(torch.bfloat16, cuda)
    assert not LOSS_BACKENDS["liger"].supports(torch.bfloat16, cpu)


def test_our_fp8_recipes_are_for_our_gpt_only():
    assert [n for n, r in FP8_RECIPES.items() if r.supports("te")] == ["tensorwise", "rowwise"]
    assert all(r.supports("gpt") for r in FP8_RECIPES.values())


def test_unknown_arch_lists_the_choices():
    from nanochat.model import model_class
    with pytest.raises(ValueError, match=r"unknown architecture 'moe'; choose one of: gpt, te \(--arch\)"):
        model_class("moe")
    assert model_class("gpt").__name__ == "GPT"

