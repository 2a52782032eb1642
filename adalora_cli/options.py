"""Command-line options generated from dataclass fields, so that a setting's name, type, default and help are
declared once, on its dataclass field (`field(metadata={"help": ..., "panel": ..., "shown": ...})`).

A field becomes `--name-with-dashes`: its type comes from the annotation (`X | None` -> X; metadata `option_type`
where the command line reads it differently, e.g. a budget `300k` read as text and parsed by the config), a bool is a
`--x/--no-x` flag and a list a repeatable option. Every option defaults to None, so that "not given" stays distinct
from a value equal to the default (the config layers below it, a YAML file or a resumed run, then stand); `--help`
shows the field's default, or its `shown` text. Fields marked `internal` and sections (dict-typed fields, set with
`--set section.key=value`) are not options.

Typer reads a command's options off its function's signature: `with_field_options` rewrites that signature (the
function's own parameters, then one per field) and the function receives the generated ones in `**options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Annotated, Any, Callable, Iterable, Optional

import typer


Where = Callable[[type, dataclasses.Field], Any]  # whether field f of class cls is wanted


def option_fields(classes: Iterable[type], where: Where | None = None) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for each command-line setting of `classes` (those `where` accepts), in order. A name
    declared by several classes is taken once, from the first (task families share settings such as `text_column`)."""
    seen, found = set(), []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if (f.name in seen or f.metadata.get("internal") or _is_section(tp)
                    or (where is not None and not where(cls, f))):
                continue
            if not f.metadata.get("help"):
                raise TypeError(f"{cls.__name__}.{f.name} is a command-line setting without metadata 'help'")
            seen.add(f.name)
            found.append((f, tp))
    return found


def _is_section(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _inner(tp: Any) -> Any:
    """`X` of `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return tp


def shown_default(f: dataclasses.Field) -> str:
    """The default as `--help` shows it: the field's `shown` text, else its value (`none` for None)."""
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return "none" if value is None else str(value)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_parameter(f: dataclasses.Field, tp: Any, panel: str | None = None, shown: str | None = None
                    ) -> inspect.Parameter:
    """The keyword parameter that makes typer declare field `f` as an option (default None: not given)."""
    kind = f.metadata.get("option_type", _inner(tp))
    name = option_name(f.name)
    declaration = f"{name}/--no-{name[2:]}" if kind is bool else name
    text = f"{f.metadata['help']}  [default: {shown if shown is not None else shown_default(f)}]"
    info = typer.Option(declaration, help=text, show_default=False,
                        rich_help_panel=panel if panel is not None else f.metadata.get("panel"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def with_field_options(classes: Iterable[type], where: Where | None = None, panel: str | None = None,
                       shown: str | None = None):
    """Decorator for a typer command `def command(own..., **options)`: one option per field of `classes` (see
    `option_fields`) after the command's own parameters; `panel` and `shown` replace every field's own."""

    def decorate(command):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = [field_parameter(f, tp, panel, shown) for f, tp in option_fields(classes, where)]
        clash = {p.name for p in own} & {p.name for p in generated}
        if clash:
            raise TypeError(f"{command.__name__}: parameters {sorted(clash)} are also fields")
        command.__signature__ = inspect.Signature(own + generated)
        return command

    return decorate


def as_arguments(values: dict[str, Any]) -> list[str]:
    """The command-line arguments that give these generated options again (`with_field_options`' `**options`):
    None (not given) is left out, a bool is `--x` / `--no-x`, a list repeats its option. `adalora sweep` passes the
    user's options on to every `adalora train` this way."""
    arguments: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        flag = option_name(name)
        if isinstance(value, bool):
            arguments.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            for item in value:
                arguments += [flag, str(item)]
        else:
            arguments += [flag, str(value)]
    return arguments
