"""The option machinery the typed configuration (config.py) is written with: `option(...)` declares a field with its
help, minimum and flag name; `build` turns a mapping into a dataclass and `from_flags` the flat `--flag` values of the
command line, each value parsed and checked once (`coerce`: type, choice, range), every error one line naming the key
or flag the user wrote; `describe` writes `--help`. Knows nothing of DePT: config.py says what the fields are.

    build(JobConfig, {"train": {"steps": "100"}}, "stage source")   # a recipe mapping (YAML or text values)
    from_flags(JobConfig, {"steps": "100", "task": "rte"}, "")      # command-line flags, sections flattened
    check_partial(TrainArgs, {"steps": 100}, "train")               # a section's keys and types, no cross-field rules

Strings (the command line's values) are read as YAML reads them ('[4, 16]' a list, '{a: 1}' a mapping); values
already typed (a YAML file's) are only checked. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Literal, Union

from pipeline.errors import PipelineError, did_you_mean


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    minimum: float | None = None,
    cli: str | None = None,
    positional: bool = False,
    default_factory: Any = MISSING,
    cli_only: bool = False,
):
    """A dataclass field with the metadata the CLI and the validator read.

    help: one line for `--help`; minimum: the smallest value allowed; cli: the flag's name when it differs from the
    field's (documented alias); positional: a command's positional argument.
    """
    metadata = {"help": help, "minimum": minimum, "cli": cli, "positional": positional, "cli_only": cli_only}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------- values


def _is_optional(tp) -> bool:
    return _origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _origin(tp):
    return typing.get_origin(tp)


def _type_name(tp) -> str:
    if _origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if _origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if _origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "list"
    return getattr(tp, "__name__", str(tp))


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_text(value: str):
    """A command-line string as YAML would read it ('[4, 16]' -> list, '{a: 1}' -> dict), else the string."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def coerce(value, tp, path: str):
    """`value` as type `tp`, or a PipelineError naming `path`. Strings (from the command line) are parsed."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Union[tuple(inner)]  # noqa: UP007 -- built at run time
    if value is None:
        raise PipelineError(f"{path}: null is not allowed here; give a value")
    origin = _origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        text = str(value).strip()
        for choice in choices:
            if text.lower() == str(choice).lower():
                return choice
        raise PipelineError(
            f"{path}: {value!r} is not one of {', '.join(map(str, choices))}"
            f"{did_you_mean(text, [str(c) for c in choices])}"
        )
    if origin in (Union, types.UnionType):  # e.g. str | dict (a task name or a custom task mapping)
        for option_type in typing.get_args(tp):
            if isinstance(value, option_type):
                return value
        raise PipelineError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise PipelineError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            value = _number(value.strip(), path, "an integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise PipelineError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _number(value.strip(), path, "a number")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PipelineError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a custom task's label word written as a number
        if not isinstance(value, str):
            raise PipelineError(f"{path}: expected text, got {type(value).__name__} {value!r}")
        return value
    if origin is list or tp is list:
        if isinstance(value, str):
            parsed = _parse_text(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        (item,) = typing.get_args(tp) or (Any,)
        return value if item is Any else [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise PipelineError(f"{path}: expected a mapping such as {{key: value}}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    return value


def _number(text: str, path: str, what: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise PipelineError(f"{path}: expected {what}, got {text!r}") from None


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls, raw, path: str):
    """A `cls` dataclass from a mapping: unknown keys, wrong types, choices and minimums are refused with `path`."""
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    return _assemble(cls, _checked_fields(cls, {} if raw is None else raw, path), path)


def check_partial(cls, raw, path: str) -> dict:
    """Validate a partial section (some fields of `cls`, e.g. a recipe's `train:`): keys and types, coerced values
    returned; cross-field rules wait until the job's full config is built."""
    return {} if raw is None else _checked_fields(cls, raw, path)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _checked(spec: dataclasses.Field, tp, value, where: str):
    """One value parsed and checked against its field: type, choice (`coerce`), minimum; errors name `where`."""
    value = coerce(value, tp, where)
    minimum = spec.metadata.get("minimum")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise PipelineError(f"{where}: must be at least {minimum:g}, got {value!r}")
    return value


def _checked_fields(cls, raw, path: str) -> dict:
    """The keys of the mapping `raw`, each a field of `cls`, with their values checked (`_checked`)."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    types_ = field_types(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise PipelineError(
                f"{_at(path, key)}: unknown key{did_you_mean(str(key), known)}; known keys: {', '.join(known)}"
            )
    return {key: _checked(known[key], types_[key], value, _at(path, key)) for key, value in raw.items()}


def _assemble(cls, values: dict, path: str):
    """`cls(**values)` from checked values (sections given as mappings are assembled first); a missing required
    field and a cross-field rule of `__post_init__` are refused naming `path`."""
    types_ = field_types(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in values:
            if dataclasses.is_dataclass(types_[spec.name]) and isinstance(values[spec.name], dict):
                values[spec.name] = _assemble(types_[spec.name], values[spec.name], _at(path, spec.name))
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise PipelineError(f"{_at(path, spec.name)}: required key is missing")
    try:
        return cls(**values)
    except PipelineError as err:  # a cross-field rule of __post_init__: say where (a recipe stage, say)
        raise PipelineError(f"{path}: {err}" if path and not str(err).startswith(path) else str(err)) from None


def to_dict(obj) -> dict:
    """A config as plain JSON-able values (what results.json and recipe.resolved.yaml record)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


# ---------------------------------------------------------------------------------------------- flags


def flag_name(spec: dataclasses.Field) -> str:
    return spec.metadata.get("cli") or spec.name


def flat_fields(cls) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """`{flag: (path to the field, field, type)}` for every leaf of `cls`, sections flattened (JobConfig: the
    fields of dept/train/data become top-level flags)."""
    out = {}
    types_ = field_types(cls)
    for spec in dataclasses.fields(cls):
        tp = types_[spec.name]
        if dataclasses.is_dataclass(tp):
            for flag, (sub, leaf, leaf_type) in flat_fields(tp).items():
                out[flag] = ((spec.name, *sub), leaf, leaf_type)
        else:
            out[flag_name(spec)] = ((spec.name,), spec, tp)
    return out


def from_flags(cls, flags: dict, path: str):
    """A `cls` from flat `--flag` values (the command line's strings), each parsed once; errors name the flag the
    user typed; sections nested back."""
    leaves = flat_fields(cls)
    nested: dict = {}
    for flag, value in flags.items():
        if flag not in leaves:
            raise PipelineError(f"--{flag}: unknown flag{did_you_mean(flag, leaves)}")
        route, spec, leaf_type = leaves[flag]
        node = nested
        for part in route[:-1]:
            node = node.setdefault(part, {})
        node[route[-1]] = _checked(spec, leaf_type, value, f"--{flag}")
    return _assemble(cls, nested, path)


def describe(cls, title: str) -> list[str]:
    """`--help` lines for the flags of `cls`, one section per nested dataclass."""
    lines, types_ = [f"{title}:"], field_types(cls)
    sections = []
    for spec in dataclasses.fields(cls):
        tp = types_[spec.name]
        if dataclasses.is_dataclass(tp):
            sections.append((spec.name, tp))
            continue
        lines.append(_flag_line(spec, tp))
    for name, section in sections:
        lines += ["", f"{(section.__doc__ or name).strip().splitlines()[0]}"]
        lines += [_flag_line(spec, tp) for spec, tp in zip(dataclasses.fields(section), field_types(section).values())]
    return lines


def _flag_line(spec: dataclasses.Field, tp) -> str:
    """`  --flag   help [type; default]`, wrapped to 118 columns under the help column."""
    import textwrap

    name = spec.name.upper() if spec.metadata.get("positional") else f"--{flag_name(spec)}"
    if spec.default is not MISSING:
        default = f"; default {spec.default!r}" if spec.default not in (None, "", []) else ""
    elif spec.default_factory is not MISSING:
        default = ""
    else:
        default = "; required"
    kind = _type_name(tp)
    text = f"{spec.metadata.get('help', '')} [{'one of ' if _origin(tp) is Literal else ''}{kind}{default}]"
    lines = textwrap.wrap(text, width=118 - 27) or [""]
    return "\n".join([f"  {name:<24} {lines[0]}"] + [" " * 27 + line for line in lines[1:]])
