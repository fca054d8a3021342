"""One declaration per option (tasks/options.py): every command that takes a group has each of its options with
the same flag, default and help; a new option added to a group appears on every such command; refused values
name their flag."""

from __future__ import annotations

import pytest
import typer
from pydantic import BaseModel
from typer.main import get_command

from influence_audit.cli import app
from influence_audit.options import Opts, build_group, takes
from influence_engine.errors import UserError
from influence_engine.strategies import STRATEGIES
from tasks.options import GROUPS, AuditParams, FactorOptions, flag_of, option


def _commands(group, prefix: str = "") -> dict:
    out = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out |= _commands(cmd, f"{prefix}{name} ")
        else:
            out[f"{prefix}{name}"] = cmd
    return out


COMMANDS = _commands(get_command(app))


def _options(cmd) -> dict:  # typer vendors click: its own classes, the same attributes
    return {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}


def test_every_declared_option_has_help_and_a_flag():
    for name, group in GROUPS.items():
        for field_name, f in group.model_fields.items():
            assert f.description, f"{name}.{field_name} has no help"
            assert flag_of(group, field_name).startswith("--")


def test_the_same_flag_has_the_same_default_and_help_on_every_command():
    seen: dict[str, tuple[object, str, str]] = {}
    for cmd_name, cmd in COMMANDS.items():
        for group in GROUPS.values():
            for field_name in group.model_fields:
                flag = flag_of(group, field_name)
                opt = _options(cmd).get(flag)
                if opt is None:
                    continue
                key = (opt.default, opt.help)
                # the exceptions say why where they are made: verify checks 10 by default, score needs queries,
                # sync records into each audit's own experiment, index query's --model overrides the index's, the
                # webhook checks versions only on a server it is given
                if cmd_name == "webhook serve" or flag in ("--verify", "--queries", "--experiment", "--model"):
                    continue
                if flag in seen:
                    assert seen[flag][:2] == key, f"{flag} differs on {cmd_name} and {seen[flag][2]}"
                seen.setdefault(flag, (*key, cmd_name))


def test_commands_that_read_training_data_all_take_the_data_and_engine_groups():
    data_flags = {flag_of(GROUPS["data"], f) for f in GROUPS["data"].model_fields}
    engine_flags = {flag_of(GROUPS["factors"], f) for f in GROUPS["factors"].model_fields}
    for name in ("score", "fit-factors", "quality", "index build", "audit"):
        flags = set(_options(COMMANDS[name]))
        assert data_flags <= flags, (name, data_flags - flags)
        assert engine_flags <= flags, (name, engine_flags - flags)
        assert _options(COMMANDS[name])["--layers"].default == "auto"


def test_the_audit_id_and_home_are_named_alike_everywhere():
    for name in ("verify", "evaluate", "sync", "ui", "review show", "review submit", "review pull"):
        flags = set(_options(COMMANDS[name]))
        assert {"--audit", "--output-dir", "--home"} <= flags, name


def test_the_flow_parameters_are_every_group_an_audit_takes():
    audit_fields = set(AuditParams.model_fields)
    for name in ("model", "data", "factors", "runtime", "queries", "sampling", "search", "index", "verify",
                 "quality", "audit", "output"):
        assert set(GROUPS[name].model_fields) <= audit_fields, name


def test_strategy_choices_are_the_engines():
    assert set(FactorOptions.model_fields["strategy"].annotation.__args__) == set(STRATEGIES)


def test_a_new_option_in_a_group_reaches_every_command_that_takes_it(monkeypatch):
    class Extended(FactorOptions):
        temperature: float = option(1.0, gt=0, help="A new engine option")

    monkeypatch.setitem(GROUPS, "factors", Extended)
    got = {}

    @takes("factors")
    def one(opts: Opts = None) -> None:
        got["one"] = opts.factors.temperature

    @takes("factors", "runtime")
    def two(opts: Opts = None) -> None:
        got["two"] = opts.factors.temperature

    sub = typer.Typer()
    sub.command("one")(one)
    sub.command("two")(two)
    for name in ("one", "two"):
        get_command(sub).commands[name].main(["--temperature", "0.5"], standalone_mode=False)
    assert got == {"one": 0.5, "two": 0.5}
    with pytest.raises(UserError, match="^--temperature -1.0: must be > 0"):
        get_command(sub).commands["one"].main(["--temperature", "-1"], standalone_mode=False)


def test_refused_values_name_their_flag():
    from tasks.options import IndexOptions, VerifyOptions

    with pytest.raises(UserError, match=r"^--damping 'lots': give 'auto'"):
        build_group(FactorOptions, {"damping": "lots"})
    with pytest.raises(UserError, match=r"^--verify -1: must be >= 0"):
        build_group(VerifyOptions, {"verify_k": -1})
    with pytest.raises(UserError, match=r"^--sketch 'big': give lowrank:R"):
        build_group(IndexOptions, {"sketch": "big"}, partial=True)
    assert isinstance(build_group(FactorOptions, {}), BaseModel)
