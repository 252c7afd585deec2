"""The bus settings every process shares, and how any aha config is loaded.

One file drives every process: a `[bus]` section shared by all, and one section per process
(`[actor]`, `[rewarder]`, `[learner]`). Environment variables override the file
(`AHA_BUS__URL=...`, double underscore between levels) and CLI flags override both.
`NATS_URL` alone also sets `bus.url`, as every NATS tool does.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Iterator
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


class StageSettings(BaseModel):
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
    tasks: StageSettings = Field(default_factory=StageSettings)
    """The learner -> actors stage."""
    rollouts: StageSettings = Field(default_factory=StageSettings)
    """The actors -> rewarders stage."""
    scored: StageSettings = Field(
        default_factory=lambda: StageSettings(ack_wait_s=300.0, max_ack_pending=4096)
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

    def stage(self, name: str) -> StageSettings:
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


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    *,
    section: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> C:
    """Build `cls` from file section + `AHA_<SECTION>__...` variables + `overrides`.

    With `section="actor"`, the file's `[actor]` table is used and its `[bus]` table becomes
    the config's `bus` field (when `cls` has one). Raises `ConfigError` naming every bad field.
    """
    environ = dict(os.environ if environ is None else environ)
    where = f" ({path})" if path else ""
    data = read_file(path) if path else {}
    values: dict[str, Any] = {}
    if section is None:
        values = data
    else:
        unknown = set(data) - {section, "bus", "actor", "rewarder", "learner", "up"}
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)}{where}")
        values = dict(data.get(section) or {})
        if "bus" in cls.model_fields and "bus" in data:
            values["bus"] = merge(data["bus"], values.get("bus", {}))
    if section is not None:
        values = merge(values, _env_overrides(f"AHA_{section.upper()}__", environ))
    if "bus" in cls.model_fields or cls is BusConfig:
        bus_env = _env_overrides("AHA_BUS__", environ)
        if cls is BusConfig:
            values = merge(values, bus_env)
        elif bus_env:
            values["bus"] = merge(values.get("bus", {}), bus_env)
    values = merge(values, overrides or {})
    prefix = f"{section}." if section else ""
    try:
        # Free-form fields (task meta, sandbox limits) too: a NaN is never a setting.
        _check_finite(values, section or "")
        return cls.model_validate(values)
    except ValidationError as e:
        fields = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{_one_line(fields)}{where}") from e
    except ValueError as e:
        raise ConfigError(f"{_one_line(e)}{where}") from e
    except RecursionError as e:
        raise ConfigError(f"{section or 'config'} is nested too deeply{where}") from e
