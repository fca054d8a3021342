"""The CLI's flags, made from the option groups declared once in :mod:`tasks.options`.

``@takes("model", "data", "factors", ...)`` on a command adds every field of those groups as a flag (name, type,
default and help from the declaration) and hands the command one validated model per group in ``opts``; a refused
value is one line naming its flag. A command declares only its own extra parameters (``--out`` and the like).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ValidationError

from influence_engine.errors import UserError
from tasks.options import GROUPS, flag_of

__all__ = ["AuditArg", "Opts", "audit_id_of", "build_group", "takes"]


class Opts:
    """The validated option groups a command takes, by group name (``opts.factors.strategy``)."""

    def __init__(self, groups: dict[str, BaseModel | None]):
        self._groups = groups

    def __getattr__(self, name: str) -> Any:
        try:
            return self._groups[name]
        except KeyError:
            raise AttributeError(name) from None

    def merged(self) -> dict[str, Any]:
        """Every option's value by field name."""
        out: dict[str, Any] = {}
        for g in self._groups.values():
            if g is not None:
                out |= g.model_dump()
        return out


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """The type typer parses a field as, and the choices to show for a Literal."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, choices = _cli_type(args[0])
        return inner | None, choices
    return annotation, ""


def _parameters(group: type[BaseModel], names: tuple[str, ...], required: set[str], optional: set[str],
                defaults: dict[str, Any]) -> list[inspect.Parameter]:
    out = []
    for name in names:
        field = group.model_fields[name]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        cli = extra.get("cli", {})
        kind, _ = _cli_type(field.annotation)
        default = defaults.get(name, ... if field.is_required() else field.default)
        if name in optional:
            default = None
            kind = kind | None
        elif name in required or default is ...:
            default = ...
            kind = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
        flags = [flag_of(group, name), *cli.get("aliases", [])]
        info = typer.Option(*flags, help=field.description or None, metavar=cli.get("metavar"),
                            show_default=default is not ... and default is not None)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=Annotated[kind, info]))
    return out


def build_group(group: type[BaseModel], values: dict[str, Any], *, partial: bool = False) -> BaseModel:
    """One group from parsed flag values; a refused value is a one-line :class:`UserError` naming its flag. With
    ``partial`` (a command taking some of the group's fields), only those are validated, each with the group's
    own validators; the others keep their defaults."""
    try:
        if not partial:
            return group(**values)
        built = group.model_construct()
        for name, value in values.items():
            group.__pydantic_validator__.validate_assignment(built, name, value)
        return built
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"]]
        flag = flag_of(group, loc[0]) if loc and loc[0] in group.model_fields else "--" + "-".join(loc)
        given = values.get(loc[0]) if loc else None
        shown = f" {given!r}" if isinstance(given, (str, int, float)) and not isinstance(given, bool) else ""
        raise UserError(f"{flag}{shown}: {_message(first)}") from None


def _message(error: dict[str, Any]) -> str:
    """pydantic's message in the CLI's words."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == "literal_error":
        return f"choose one of {ctx.get('expected', '').replace(' or ', ', ')}"
    for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx and kind.startswith(("greater", "less")):
            return f"must be {sign} {ctx[key]}"
    return error["msg"].removeprefix("Value error, ")


def takes(*names: str, fields: dict[str, tuple[str, ...]] | None = None, required: tuple[str, ...] = (),
          optional: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
          ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the flags of the option groups ``names`` (every field), and of ``fields`` (group -> the
    fields of it this command uses); it receives each group validated in ``opts`` (fields it does not take keep
    their defaults). ``required`` makes optional fields required for this command, ``optional`` makes a required
    field optional (left out, its group is None), ``defaults`` changes a default for it (say why where you use it:
    commands taking a group should share its defaults)."""
    chosen = {n: tuple(GROUPS[n].model_fields) for n in names} | dict(fields or {})
    groups = {n: GROUPS[n] for n in chosen}

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func).parameters.values() if p.name != "opts"]
        added = [p for n, g in groups.items()
                 for p in _parameters(g, chosen[n], set(required), set(optional), defaults or {})]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            built: dict[str, BaseModel | None] = {}
            for n, g in groups.items():
                values = {f: kwargs.pop(f) for f in chosen[n]}
                missing = [f for f in optional if f in values and values[f] is None
                           and g.model_fields[f].is_required()]
                given = {k: v for k, v in values.items() if not (k in optional and v is None)}
                built[n] = None if missing else build_group(g, given, partial=chosen[n] != tuple(g.model_fields))
            return func(**kwargs, opts=Opts(built))

        params = own + added
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the new signature, not the function's own
        return command

    return wrap


AuditArg = Annotated[str | None, typer.Argument(help="Audit id (or --audit ID)", show_default=False)]


def audit_id_of(positional: str | None, opts: Opts, *, required: bool = True) -> str | None:
    """The audit id given as the positional argument or as ``--audit`` (the same everywhere)."""
    flag = opts.audit_ref.audit if opts.audit_ref is not None else None
    if positional and flag and positional != flag:
        raise UserError(f"two audit ids: {positional} and --audit {flag}", hint="give one")
    audit_id = positional or flag
    if required and not audit_id:
        raise UserError("which audit? give its id (--audit ID)", hint="see `influence-audit review list`")
    return audit_id
