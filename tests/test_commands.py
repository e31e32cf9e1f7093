"""One vocabulary of flags and commands: a console command per stage (pyproject's [project.scripts] ->
scripts.commands), each exiting 0 when its stage finishes, and a help text for every option of every script."""
from __future__ import annotations

import dataclasses
import importlib
import sys
import tomllib
from pathlib import Path

import pytest

from scripts import commands

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py") if p.stem not in ("__init__", "commands"))


def test_pyproject_lists_every_command():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {name: "scripts.commands:main" for name in commands.COMMANDS}
    for name in ("nanochat-tok-train", "nanochat-sft", "nanochat-rl", "nanochat-eval", "nanochat-report",
                 "nanochat-export"):
        assert name in declared
    staged = {module.removeprefix("scripts.") for module in commands.COMMANDS.values()}
    assert set(SCRIPTS) <= staged, f"scripts without a console command: {sorted(set(SCRIPTS) - staged)}"


@pytest.mark.parametrize("name", sorted(commands.COMMANDS))
def test_each_command_runs_its_stage(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{name}", "--help"])
    try:
        assert commands.main() is None
    except SystemExit as stop:  # argparse's --help
        assert stop.code == 0
    assert "usage" in capsys.readouterr().out


def test_a_finished_stage_exits_zero(monkeypatch):
    """The console wrapper passes main()'s return value to sys.exit: a stage's figures (a dict) would read as
    a failure, so the command returns None."""
    seen = []
    monkeypatch.setattr("scripts.chat_sft.main", lambda argv: seen.append(argv) or {"steps": 3})
    monkeypatch.setattr(sys, "argv", ["/venv/Scripts/nanochat-sft.exe", "--num_iterations", "3"])
    assert commands.main() is None and seen == [["--num_iterations", "3"]]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/nanochat-nope"])
    with pytest.raises(SystemExit, match="one of nanochat-dataset"):
        commands.main()


def flag_configs(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__]


@pytest.mark.parametrize("module_name", [f"scripts.{name}" for name in SCRIPTS] + ["nanochat.data.download"])
def test_every_option_has_a_help_text(module_name):
    configs = flag_configs(module_name)
    assert configs, f"{module_name} has no flags dataclass"
    missing = [f"{c.__name__}.{f.name}" for c in configs for f in dataclasses.fields(c) if not f.metadata.get("help")]
    assert not missing, f"options without a help text: {missing}"


@pytest.mark.parametrize("module_name", ["scripts.chat_cli", "scripts.chat_web", "scripts.chat_eval",
                                         "scripts.base_eval", "scripts.chat_sft", "scripts.chat_rl",
                                         "scripts.export_hf"])
def test_model_flags_are_one_vocabulary(module_name):
    """--model_tag and --model (a checkpoint directory) everywhere a model is loaded; the old names still work."""
    from nanochat.flags import build_parser

    module = importlib.import_module(module_name)
    (config,) = flag_configs(module_name)
    parser = build_parser(config, aliases=getattr(module, "FLAG_ALIASES", None))
    args = parser.parse_args(["--model_tag", "d4", "--model", "/ckpt/step_000010"])
    assert (args.model_tag, args.model) == ("d4", "/ckpt/step_000010")
    if module_name in ("scripts.chat_cli", "scripts.chat_web"):
        assert parser.parse_args(["--tag", "d4"]).model_tag == "d4"
    if module_name == "scripts.chat_eval":
        assert parser.parse_args(["-g", "d4"]).model_tag == "d4"
