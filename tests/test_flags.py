"""The command line generated from the config fields: every flag has help and is honoured or
refused, presets land in the configs, and precedence is flag > --config > --preset > field."""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import fields

import pytest

from sharelora import commands
from sharelora.cli import build_parser, main, parse_args
from sharelora.config import UsageError
from sharelora.flags import CONFIGS, configs
from sharelora.presets import PRESETS

BASE = {
    "train": ["train", "--data", "d.jsonl", "--output", "o"],
    "compare": ["compare", "--data", "d.jsonl", "--output", "o"],
    "onboard": ["onboard", "--data", "d.jsonl", "--output", "o", "--model", "m"],
    "plan": ["plan", "--users", "3"],
}


def _subparsers(show_all: bool = True) -> dict[str, argparse.ArgumentParser]:
    return build_parser(show_all)._subparsers._group_actions[0].choices


def _flags(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_flag_has_help(command):
    for action in _flags(_subparsers()[command]):
        assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings)


def test_plain_help_shows_the_essentials_and_help_all_the_rest(capsys):
    shown = [a for a in _flags(_subparsers(False)["train"]) if a.help != argparse.SUPPRESS]
    assert 12 <= len(shown) <= 15  # the dozen that matter, plus --help-all
    assert len(_flags(_subparsers()["train"])) > 2 * len(shown)
    with pytest.raises(SystemExit):
        parse_args(["train", "--help-all"])
    assert "--user-tables" in capsys.readouterr().out


def _by_class(built) -> dict:
    return {type(c).__name__: c for c in vars(built).values()}


def _other_value(f):
    """A valid value of field ``f`` other than its default, as flag text and as the value."""
    if f.metadata["choices"]:
        value = next(c for c in f.metadata["choices"] if c != f.default)
        return str(value), value
    kind = f.metadata["parse"] or type(f.default)
    if f.name in ("val", "test", "warmup_ratio", "dropout"):
        return "0.05", 0.05
    if f.name == "targets":
        return "query,key", ["query", "key"]
    if kind is float or f.name in ("prior", "strength"):
        return "0.5", 0.5
    if kind is int:
        return "7", 7
    return "x.jsonl", "x.jsonl"


@pytest.mark.parametrize("command", sorted(BASE))
def test_every_field_flag_reaches_its_config(command):
    """A flag named like a field fills that field in every config of that name."""
    for action in _flags(_subparsers()[command]):
        f = getattr(action, "field", None)
        if f is None or action.dest in ("data", "output", "preset"):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv, value = ["--no-" + action.option_strings[0][2:]], False
            if f.default is not True:
                argv, value = [action.option_strings[0]], True
        else:
            text, value = _other_value(f)
            argv = [action.option_strings[0], text]
        built = _by_class(configs(parse_args([*BASE[command], *argv])))
        owners = [c for c in CONFIGS if action.dest in {g.name for g in fields(c)}]
        for cls in owners:
            assert getattr(built[cls.__name__], action.dest) == value, (command, argv, cls)


COMMAND_FLAGS = {  # flags that are no config field, and the function that reads each
    "demo": ("quick", "output"),
    "eval": ("model", "output", "batch_size", "unknown_user"),
    "score": (
        "model",
        "input",
        "output",
        "response_col",
        "prompt_col",
        "user_col",
        "batch_size",
        "unknown_user",
    ),
    "onboard": ("model",),
    "export": ("model", "user", "format", "output"),
    "serve": ("model", "host", "port", "device", "batch_size", "max_wait_ms", "unknown_user"),
    "plan": ("users", "dtype", "memory_gib", "json"),
    "compare": ("methods", "shots"),
    "simulate": ("quick", "output", "n", "users", "rank", "seeds", "dim", "individual"),
    "prepare": ("name", "output", "source", "top_k", "ties", "seed"),
}


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_other_flag_is_read_by_its_command(command):
    """A flag that fills no config is read by the command's code (``args.NAME``), so no
    command accepts a flag it ignores."""
    own = {a.dest for a in _flags(_subparsers()[command]) if not hasattr(a, "field")}
    own |= {a.dest for a in _subparsers()[command]._actions if not a.option_strings}
    own -= {argparse.SUPPRESS}
    assert own == set(COMMAND_FLAGS.get(command, ())), command
    from sharelora.cli import demo_argv

    code = inspect.getsource(commands) + inspect.getsource(demo_argv)
    for dest in own:
        assert f"args.{dest}" in code, (command, dest)


@pytest.mark.parametrize(
    "flag",
    [
        "--strength",
        "--warmup-epochs",
        "--sparse-users",
        "--max-length",
        "--weight-decay",
        "--split-col",
    ],
)
def test_onboard_refuses_the_flags_it_fixes(flag, capsys):
    assert main([*BASE["onboard"], flag, "1"]) == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_compare_has_methods_not_method(capsys):
    assert main([*BASE["compare"], "--method", "diag"]) == 2
    assert "unrecognized arguments: --method" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_lands_in_the_configs(name):
    preset = PRESETS[name]
    command = preset.commands[0]
    args = parse_args([*BASE[command], "--preset", name] if command != "onboard" else BASE[command])
    if command == "onboard":  # onboarding applies its preset itself (sharelora.onboard)
        args = argparse.Namespace(**{**vars(args), **preset.settings})
    built = _by_class(configs(args))
    for key, value in preset.settings.items():
        owners = [c.__name__ for c in CONFIGS if key in {f.name for f in fields(c)}]
        assert owners or key == "methods", (name, key)
        for owner in owners:
            assert getattr(built[owner], key) == value, (name, key)
        if key == "methods":
            assert args.methods == value


def test_flags_win_over_config_over_preset(tmp_path):
    config = tmp_path / "c.json.yaml"
    config.write_text(json.dumps({"strength": 0.5, "epochs": 5}))
    args = parse_args(["--config", str(config), *BASE["train"], "--preset", "paper"])
    built = configs(args).train
    assert (built.strength, built.epochs, built.warmup_epochs, built.prior) == (0.5, 5, 1, 0.0)
    args = parse_args(
        ["--config", str(config), *BASE["train"], "--preset", "paper", "--strength", "0.25"]
    )
    assert configs(args).train.strength == 0.25
    config.write_text(json.dumps({"preset": "one-se"}))
    args = parse_args(["--config", str(config), *BASE["train"]])
    assert configs(args).train.strength_rule == "one-se"


def test_presets_apply_in_order_and_unknown_or_misplaced_ones_are_refused():
    built = configs(parse_args([*BASE["train"], "--preset", "unpooled,one-se"])).train
    assert (built.prior, built.strength_rule) == (0.0, "one-se")
    with pytest.raises(UsageError, match="unknown 'nope'; choose from default, paper"):
        parse_args([*BASE["train"], "--preset", "nope"])
    with pytest.raises(UsageError, match="--preset demo is for compare, not train"):
        parse_args([*BASE["train"], "--preset", "demo"])


def test_the_paper_preset_trains_as_the_paper_does(tiny_text_backbone, tmp_path):
    from conftest import opposite_tastes

    rows = [vars(c) for c in opposite_tastes(12)]
    data = tmp_path / "d.jsonl"
    keys = ("prompt", "chosen", "rejected", "user")
    data.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    argv = [
        "train",
        "--data",
        str(data),
        "--backbone",
        tiny_text_backbone,
        "--preset",
        "paper",
        "--epochs",
        "2",
        "--rank",
        "2",
        "--max-length",
        "32",
        "--no-progress",
        "--output",
        str(tmp_path / "m"),
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "m" / "sharelora.json").read_text())["training"]
    assert summary["strength"] == 1.0 and summary["prior"] == 0.0
    assert summary["population"] == "fixed at the start" and "select" not in summary
    assert summary["config"]["warmup_epochs"] == 1
    assert not (tmp_path / "m" / "shared").exists()  # the warm-up epoch is the shared stage


def test_a_research_setting_in_a_config_file_names_its_preset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("strength_rule: one-se\n")
    with pytest.raises(UsageError, match="strength_rule is set by --preset one-se"):
        parse_args(["--config", str(config), *BASE["train"]])
