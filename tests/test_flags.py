"""Every script parses flags through nanochat.flags: both spellings, bools, lists, optionals."""
from dataclasses import dataclass, field

import pytest

from nanochat.flags import parse_flags, redeclare, to_argv


@dataclass
class Config:
    depth: int = 20
    max_seq_len: int | None = None
    warmup_steps: int = 0
    compile: bool | None = None
    value_embeds: bool = False
    kernel: list[str] = None  # type: ignore[assignment]
    batch_sizes: list[int] | None = None
    lr: float = 0.02
    compiles: list[bool | None] = field(default_factory=list)


@pytest.mark.parametrize("argv", [
    ["--depth=4", "--max_seq_len=256", "--warmup_steps", "2"],
    ["--depth", "4", "--max-seq-len=256", "--warmup-steps=2"],
])
def test_both_spellings(argv):
    cfg = parse_flags(Config, argv)
    assert (cfg.depth, cfg.max_seq_len, cfg.warmup_steps) == (4, 256, 2)


def test_defaults_and_types():
    cfg = parse_flags(Config, [])
    assert cfg.depth == 20 and cfg.max_seq_len is None and cfg.compile is None and cfg.lr == 0.02
    assert parse_flags(Config, ["--lr=3e-4"]).lr == pytest.approx(3e-4)


@pytest.mark.parametrize("argv,expected", [
    (["--compile"], True), (["--compile=false"], False), (["--no-compile"], False),
    (["--compile", "0"], False), (["--compile=true"], True),
])
def test_bools(argv, expected):
    assert parse_flags(Config, argv).compile is expected


def test_bool_with_underscore_negation():
    assert parse_flags(Config, ["--value_embeds"]).value_embeds is True
    assert parse_flags(Config, ["--no-value-embeds"]).value_embeds is False
    assert parse_flags(Config, ["--no_value_embeds"]).value_embeds is False


def test_lists_and_none():
    cfg = parse_flags(Config, ["--kernel=torch,liger", "--batch-sizes=8,32"])
    assert cfg.kernel == ["torch", "liger"] and cfg.batch_sizes == [8, 32]
    assert parse_flags(Config, ["--max_seq_len=none"]).max_seq_len is None
    assert parse_flags(Config, ["--compiles=true,none,false"]).compiles == [True, None, False]  # a bench axis


def test_bad_values_exit_with_message(capsys):
    with pytest.raises(SystemExit):
        parse_flags(Config, ["--depth=four"])
    err = capsys.readouterr().err
    assert "--depth" in err and "invalid int value: 'four'" in err  # names the flag and the expected type
    with pytest.raises(SystemExit):
        parse_flags(Config, ["--batch_sizes=8,x"])
    assert "invalid comma-separated int list value: '8,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_flags(Config, ["--compile=maybe"])
    with pytest.raises(SystemExit):
        parse_flags(Config, ["--no-such-flag=1"])


def test_aliases():
    aliases = {"-i": "depth", "-t": "lr", "--layers": "depth"}
    for argv in (["-i", "4", "-t", "0.5"], ["-i=4", "-t=0.5"], ["-i4", "--lr", "0.5"], ["--layers=4", "-t", "0.5"]):
        cfg = parse_flags(Config, argv, aliases=aliases)
        assert (cfg.depth, cfg.lr) == (4, 0.5)
    with pytest.raises(ValueError, match="nosuch"):
        parse_flags(Config, [], aliases={"-x": "nosuch"})


@dataclass
class Documented:
    steps: int = field(default=3, metadata={"help": "optimizer steps"})
    tag: str = field(default="", metadata={"help": "run name (default: d<depth>)"})


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_flags(Documented, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "optimizer steps (default: 3)" in out
    assert "run name (default: d<depth>)" in out and out.count("default") == 2


@dataclass
class Derived(Documented):
    steps: int = redeclare(Documented, "steps", 5)
    tag: list[str] = redeclare(Documented, "tag", ["a", "b"], "run names")


def test_redeclare_changes_the_default_and_keeps_the_help(capsys):
    assert parse_flags(Derived, []).steps == 5 and parse_flags(Documented, []).steps == 3
    assert parse_flags(Derived, []).tag == ["a", "b"] and parse_flags(Derived, ["--tag=x,y,z"]).tag == ["x", "y", "z"]
    assert Derived().tag is not Derived().tag  # a list default is a fresh list per instance
    with pytest.raises(SystemExit):
        parse_flags(Derived, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default: 5)" in out and "run names (default: ['a', 'b'])" in out
    with pytest.raises(ValueError, match="Documented has no field 'stpes'"):
        redeclare(Documented, "stpes", 1)


def test_to_argv_reads_back_as_the_same_config():
    cfg = Config(depth=4, max_seq_len=None, compile=None, value_embeds=True, kernel=["current", "liger"],
                 batch_sizes=[8, 32], lr=0.1 + 0.2, compiles=[None, False])
    assert parse_flags(Config, to_argv(cfg)) == cfg
    assert to_argv(cfg, ["compile", "kernel"]) == ["--compile=none", "--kernel=current,liger"]
    assert parse_flags(Config, to_argv(Config(compile=False, kernel=[]))) == Config(compile=False, kernel=[])
