"""Load a run config from YAML plus ``key=value`` overrides and validate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from fedfm.config.schema import RunConfig
from fedfm.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _shown(value) -> str:
    return f" (got {value!r})" if not isinstance(value, dict) and value is not None else ""


def format_validation_error(err: ValidationError) -> str:
    """All problems on one line: ``unknown key 'a.b'`` or ``'a.b': message (got value)``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "entry_options":  # an entry's own options (fedfm.config.schema.EntrySection)
            for p in e["ctx"]["problems"]:
                where = f"{loc}.{p['key']}" if p["key"] else loc
                parts.append(f"unknown key '{where}'" if p["msg"] is None else f"'{where}': {p['msg']}{_shown(p['input'])}")
        else:
            parts.append(f"'{loc}': {e['msg']}{_shown(e.get('input'))}")
    return "invalid config: " + "; ".join(parts)


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read ``path`` (None: the embedded default job), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _mapping(p.read_text(), f"config file {p}", source=str(p))
    else:
        data = {"name": "default"}
    return validate(apply_overrides(data, overrides))


def config_from_text(text: str, overrides: Iterable[str] = ()) -> RunConfig:
    """A validated RunConfig from YAML text (a deployed run's config travels as text)."""
    return validate(apply_overrides(_mapping(text, "the run's config", source="<run config>"), overrides))


def _mapping(text: str, what: str, source: str = "<config>") -> dict:
    """The top-level mapping of YAML ``text``; a syntax error names ``source:line:column``."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_line(err, what, source)) from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} must hold a mapping at the top level")
    return loaded


def yaml_error_line(err: yaml.YAMLError, what: str, source: str) -> str:
    """``source:line:column: not valid YAML: problem (context)`` from yaml's problem mark (1-based).

    Without a mark: ``what is not valid YAML: problem``.
    """
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"{what} is not valid YAML: {detail}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {detail}"


def to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def resolve_config(config, overrides: Iterable[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML path (None: the default job), a RunConfig or a dict, plus overrides."""
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        data = to_dict(config)
    elif isinstance(config, dict):
        data = dict(config)
    else:
        raise ConfigError(f"config must be a RunConfig, a dict or a YAML path, not {type(config).__name__}")
    return validate(apply_overrides(data, overrides))
