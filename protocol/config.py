"""The bus settings every process shares, and how any aha config is loaded.

One file drives every process: a `[bus]` section shared by all, and one section per part.
The parts register their sections (the `aha.config` entry points in pyproject.toml, name ->
model), so this module names none of them. Environment variables override the file
(`AHA_BUS__URL=...`, double underscore between levels), a command's own flags override both,
and `--set section.field=value` overrides everything. `NATS_URL` alone also sets `bus.url`,
as every NATS tool does.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import typing
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config or input file that cannot be used: one line, naming the field or the file.

    `aha` prints it as `aha <command>: error: <message>` and exits 2, before any long work.
    """


CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
"""Every config model's settings: no unknown fields, immutable, no NaN or infinity."""


class StageConfig(BaseModel):
    """Stream limits and consumer behaviour of one work-queue stage."""

    model_config = CONFIG

    ack_wait_s: float = Field(60.0, gt=0)
    """Seconds a delivered message stays leased before the server redelivers it (handlers send in_progress to extend)."""
    max_deliver: int = Field(5, ge=1)
    """Deliveries before a message is dead-lettered."""
    max_ack_pending: int = Field(1024, ge=1)
    """Most messages leased to all consumers of this stage at once."""
    max_age_s: float = Field(7 * 24 * 3600.0, ge=0)
    """Oldest message kept in the stream; 0 = no limit."""
    max_bytes: int = Field(-1, ge=-1)
    """Stream size limit in bytes; -1 = no limit."""
    backoff_s: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0])
    """Nak delays after the 1st, 2nd, ... failed attempt (the last repeats)."""


class BusConfig(BaseModel):
    """Where NATS is and how aha's streams, buckets and consumers are set up."""

    model_config = CONFIG

    url: str | None = None
    """NATS server URL(s), comma-separated; None = the `NATS_URL` variable, else start an embedded server (where a process can)."""
    user: str | None = None
    """User name for user/password authentication."""
    password: str | None = None
    """Password for `user`."""
    token: str | None = None
    """Token authentication."""
    creds_file: str | None = None
    """NATS `.creds` file (JWT + nkey seed)."""
    nkey_seed_file: str | None = None
    """File with an nkey seed (`SU...`)."""
    tls_ca_file: str | None = None
    """CA bundle that signed the server's certificate; setting it turns TLS on."""
    tls_cert_file: str | None = None
    """Client certificate, for servers that verify clients."""
    tls_key_file: str | None = None
    """Key of `tls_cert_file`."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Per-attempt connection timeout."""
    replicas: int = Field(1, ge=1, le=5)
    """Stream replicas (1 for a single server; 3 for a clustered NATS)."""
    storage: Literal["file", "memory"] = "file"
    """Stream storage; `file` survives a server restart."""
    duplicate_window_s: float = Field(600.0, gt=0)
    """How long the server remembers Nats-Msg-Id values to drop duplicate publishes."""
    tasks: StageConfig = Field(default_factory=StageConfig)
    """The learner -> actors stage."""
    rollouts: StageConfig = Field(default_factory=StageConfig)
    """The actors -> rewarders stage."""
    scored: StageConfig = Field(
        default_factory=lambda: StageConfig(ack_wait_s=300.0, max_ack_pending=4096)
    )
    """The rewarders -> learner stage (the learner holds messages until a checkpoint)."""
    dead_max_age_s: float = Field(30 * 24 * 3600.0, ge=0)
    """How long dead letters are kept."""
    weights_history: int = Field(1, ge=1, le=64)
    """Manifest revisions kept in the KV bucket."""
    setup_streams: bool = True
    """Create or update the streams, consumers and buckets at connect; False where the NATS user
    may not manage JetStream (locked-down actors, rewarders, exporter: the learner sets up)."""

    @model_validator(mode="after")
    def _auth(self):
        if self.password is not None and self.user is None:
            raise ValueError("password is set without user")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    @property
    def resolved_url(self) -> str | None:
        return self.url or os.environ.get("NATS_URL") or None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a user's file; `ConfigError` naming the file when it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e} ({path})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"not UTF-8: byte {data[e.start]:#04x} ({path}:{line})") from e


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or YAML config file into a dict."""
    path = Path(path)
    text = read_text(path)
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if kind == "TOML" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"not valid {kind}: {_one_line(e)} ({path})") from e
    except RecursionError as e:  # both parsers recurse once per level of nesting
        raise ConfigError(f"nested too deeply to be a config ({path})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level ({path})")
    try:
        _check_finite(data, "")  # TOML's nan/inf and YAML's .nan/.inf are never a setting
    except ValueError as e:
        raise ConfigError(f"{e} ({path})") from None
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-empty line of a JSONL file of objects.

    Strict JSON: `NaN` and `Infinity` are refused, and so is a number too large for a float.
    Raises `ConfigError` naming the file and line of the first bad one.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e} ({path})") from e
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line.rstrip("\r\n"), parse_constant=_refuse_constant)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                _check_finite(row, "")
            except UnicodeDecodeError as e:
                raise ConfigError(f"not UTF-8: byte {raw[e.start]:#04x} ({path}:{number})") from e
            except RecursionError as e:
                raise ConfigError(f"nested too deeply ({path}:{number})") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"not JSON: {e.msg} at column {e.colno} ({path}:{number})") from e
            except ValueError as e:
                raise ConfigError(f"{_one_line(e)} ({path}:{number})") from e
            yield number, row


def _check_finite(value: Any, where: str) -> None:
    """Raise ValueError naming the first NaN or infinite float in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _env_overrides(prefix: str, environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(prefix):
            continue
        path = key[len(prefix) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value) if value else value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, key by key at every level of nested tables."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def sections() -> dict[str, Any]:
    """Section name -> entry point of its model, as the parts register them (`aha.config`)."""
    return {ep.name: ep for ep in entry_points(group="aha.config")}


def section_model(name: str) -> type[BaseModel]:
    """The config model of section `name`; `ConfigError` listing the sections there are."""
    registered = sections()
    if name not in registered:
        raise ConfigError(
            f"no config section {name!r} (there are: {', '.join(sorted(registered))})"
        )
    return registered[name].load()


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML value (`0.6`, `true`, `"a b"`, `[1, 2]`, `{x = 1}`), JSON's
    `null` (None), or else the text itself (`--set actor.model=/models/x`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`["learner.grpo.beta=0", ...]` as nested tables; `ConfigError` naming a malformed one."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        path = key.strip().split(".")
        if not eq or not all(part.strip() for part in path):
            raise ConfigError(f"--set {item}: expected SECTION.FIELD=VALUE")
        value: Any = parse_value(text.strip())  # `null` stays: it sets a field to None
        for part in reversed(path):
            value = {part.strip(): value}
        out = merge(out, value)
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (`"bus.url"`) as nested tables; keys whose value is None are left out (a
    flag that was not given)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def sets_in(items: Iterable[str], section: str) -> list[str]:
    """The `--set` items of one section (`aha up` reads `[up]` and hands the rest to its parts)."""
    return [item for item in items if item.split(".", 1)[0].strip() == section]


def read_config(path: str | Path | None, sets: Iterable[str] = ()) -> dict[str, Any]:
    """The whole config file (all sections) with `--set` items merged in."""
    return merge(read_file(path) if path else {}, parse_sets(sets))


def config_from_args(cls: type[C], args: Any, section: str, flags: dict[str, Any]) -> C:
    """A command's config: `args.config` (file), environment, the command's own `flags`
    (dotted names within the section; None = not given), then `args.set`."""
    return load_config(
        cls,
        getattr(args, "config", None),
        section=section,
        overrides=nest(flags),
        sets=getattr(args, "set", None) or (),
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def known_fields(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """The fields of the model that holds `loc` (a pydantic error location), or None."""
    model: type[BaseModel] | None = cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
        if model is None:
            return None
    return sorted(model.model_fields)


def _describe(cls: type[BaseModel], e: ValidationError, prefix: str, sets: dict, where: str) -> str:
    """Every bad field, with the fields there are for an unknown one; named as from `--set`
    where it came from there, else from the file."""
    out, from_file = [], False
    for err in e.errors():
        line = f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        fields = known_fields(cls, err["loc"]) if err["type"] == "extra_forbidden" else None
        if fields is not None:
            line += f" (known: {', '.join(fields)})"
        if _holds(sets, err["loc"]):
            line += " (--set)"
        else:
            from_file = True
        out.append(line)
    return "; ".join(out) + (where if from_file else "")


def _holds(tree: Any, loc: tuple) -> bool:
    if not loc:  # a model-wide rule: not one field's
        return False
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _section_values(
    cls: type[BaseModel], data: dict[str, Any], section: str, where: str
) -> dict[str, Any]:
    """The file's `[section]` table, with its `[bus]` table as the `bus` field."""
    registered = sections()
    unknown = set(data) - {section, "bus"} - set(registered)
    if registered and unknown:  # not installed (no entry points): any section goes
        raise ConfigError(f"unknown section(s) {sorted(unknown)}{where}")
    values = dict(data.get(section) or {})
    if "bus" in cls.model_fields and "bus" in data:
        values["bus"] = merge(data["bus"], values.get("bus", {}))
    return values


def _sets_for(cls: type[BaseModel], section: str | None, sets: Iterable[str]) -> dict[str, Any]:
    """The `--set` items of this section (and `bus.*` where the config has a bus), as overrides;
    `ConfigError` for an item of a section this command does not read."""
    tables = parse_sets(sets)
    if section is None:
        return tables
    out = dict(tables.pop(section, None) or {})
    if "bus" in tables and "bus" in cls.model_fields:
        out["bus"] = merge(out.get("bus", {}), tables.pop("bus"))
    if tables:
        reads = f"[{section}]" + (" and [bus]" if "bus" in cls.model_fields else "")
        raise ConfigError(f"--set {', '.join(sorted(tables))}.*: this command reads only {reads}")
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    *,
    section: str | None = None,
    overrides: dict[str, Any] | None = None,
    sets: Iterable[str] = (),
    environ: dict[str, str] | None = None,
) -> C:
    """Build `cls` from file section + `AHA_<SECTION>__...` variables + `overrides` + `sets`.

    With `section="actor"`, the file's `[actor]` table is used and its `[bus]` table becomes
    the config's `bus` field (when `cls` has one). `sets` are `--set` items, named from the
    section (`actor.sampling.temperature=0.6`, `bus.url=...`). Raises `ConfigError` naming
    every bad field (and, for an unknown one, the fields there are).
    """
    environ = dict(os.environ if environ is None else environ)
    where = f" ({path})" if path else ""
    data = read_file(path) if path else {}
    values = data if section is None else _section_values(cls, data, section, where)
    if section is not None:
        values = merge(values, _env_overrides(f"AHA_{section.upper()}__", environ))
    if "bus" in cls.model_fields or cls is BusConfig:
        bus_env = _env_overrides("AHA_BUS__", environ)
        if cls is BusConfig:
            values = merge(values, bus_env)
        elif bus_env:
            values["bus"] = merge(values.get("bus", {}), bus_env)
    values = merge(values, overrides or {})
    set_values = _sets_for(cls, section, sets)
    values = merge(values, set_values)
    prefix = f"{section}." if section else ""
    try:
        # Free-form fields (task meta, sandbox limits) too: a NaN is never a setting.
        _check_finite(values, section or "")
        return cls.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_one_line(_describe(cls, e, prefix, set_values, where))) from e
    except ValueError as e:
        raise ConfigError(f"{_one_line(e)}{where}") from e
    except RecursionError as e:
        raise ConfigError(f"{section or 'config'} is nested too deeply{where}") from e


def show_config(section: str, path: str | Path | None, sets: Iterable[str] = ()) -> str:
    """The resolved config of `section` as TOML, a file the part can be started with: its
    `bus` field as the `[bus]` table, unset (None) fields left out."""
    import tomli_w

    config = load_config(section_model(section), path, section=section, sets=sets)
    values = _drop_none(config.model_dump(mode="json"))
    if section == "bus":
        return tomli_w.dumps({"bus": values})
    bus = values.pop("bus", None)
    return tomli_w.dumps({section: values, **({"bus": bus} if bus is not None else {})})


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
