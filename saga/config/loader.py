"""Reading, interpolating and validating configuration into `SagaConfig`.

The schema is the dataclasses of `saga.config.model` (and `KafkaSettings` for ``broker.kafka``): a key is
valid when it is a field, and its value must fit the field's type. Errors are `SagaConfigError` naming the
dotted key and the problem in words a person can act on::

    config/default.yml: storage.ulr: unknown key (did you mean 'url'?)
    config/default.yml: recovery.interval: expected a number, got 'fast'
    config/kafka.yml: storage.url: environment variable SAGA_DATABASE_URL is not set and has no default

String values may reference the environment: ``${NAME}`` (an error when ``NAME`` is not set) and
``${NAME:default}`` (the default when it is not set); ``$$`` is a literal ``$``. A value that is a
reference may fill a number or boolean field (``interval: ${RECOVERY_INTERVAL:5}``); an empty one fills an
optional field with nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from broker.errors import BrokerConfigError
from broker.settings import KafkaSettings
from saga.config.model import SagaConfig
from saga.config.participant import check_participant
from saga.errors import SagaConfigError
from saga.limits import MAX_DURATION_SECONDS, MAX_INTERVAL_SECONDS, MAX_LEASE_SECONDS

__all__ = ["interpolate", "load_config", "read_config_file"]

_REFERENCE = re.compile(r"\$(\$|\{([^}]*)\}|\{)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")
_YAML12_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Lower bounds of numeric keys: (minimum, inclusive).
_MINIMUMS: dict[str, tuple[float, bool]] = {
    "broker.memory.partitions": (1, True),
    "consumer.concurrency": (1, True),
    "outbox.relay_interval": (0, False),
    "recovery.interval": (0, False),
    "recovery.batch_size": (1, True),
    "recovery.max_recovery_attempts": (1, True),
    "recovery.stale_after_seconds": (0, True),
    "recovery.lease_seconds": (0, False),
    "recovery.concurrency": (1, True),
    "storage.pool_size": (1, True),
    "timeouts.default_reply_seconds": (0, False),
    "metrics.port": (1, True),
    "metrics.refresh_interval": (0, False),
    "ui.port": (1, True),
    "ui.page_size": (1, True),
}


# Upper bounds of numeric keys (inclusive), so that no value overflows a timestamp or a sleep later.
_MAXIMUMS: dict[str, float] = {
    "broker.memory.partitions": 10_000,
    "consumer.concurrency": 100_000,
    "outbox.relay_interval": MAX_INTERVAL_SECONDS,
    "recovery.interval": MAX_INTERVAL_SECONDS,
    "recovery.batch_size": 100_000,
    "recovery.max_recovery_attempts": 1_000_000,
    "recovery.stale_after_seconds": MAX_DURATION_SECONDS,
    "recovery.lease_seconds": MAX_LEASE_SECONDS,
    "recovery.concurrency": 10_000,
    "storage.pool_size": 1_000,
    "timeouts.default_reply_seconds": MAX_DURATION_SECONDS,
}


class _Interpolated(str):
    """A string produced by ``${...}`` interpolation: it may still become a number, boolean or ``None``."""

    __slots__ = ()


class _Context:
    """What the validator needs besides the value: the environment and where the data came from."""

    __slots__ = ("environ", "source")

    def __init__(self, environ: Mapping[str, str], source: str | None) -> None:
        self.environ = environ
        self.source = source

    def error(self, key: str, problem: str) -> SagaConfigError:
        return SagaConfigError(key, problem, source=self.source)


# -- public -------------------------------------------------------------------------------------------


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | SagaConfig,
    *,
    environ: Mapping[str, str] | None = None,
    source_name: str | None = None,
) -> SagaConfig:
    """Read and validate a configuration.

    Args:
        source: Path of a YAML file, or its already-parsed mapping (a `SagaConfig` is returned as is).
        environ: Variables for ``${...}`` interpolation (default: ``os.environ``).
        source_name: What to call a mapping ``source`` in error messages (a file is called by its path).

    Returns:
        The validated configuration; keys left out take their defaults.

    Raises:
        SagaConfigError: The file cannot be read, is not YAML, or a key or value is wrong. The message
            names the file, the dotted key and the problem.
    """
    if isinstance(source, SagaConfig):
        return source
    env = os.environ if environ is None else environ
    if isinstance(source, Mapping):
        data: Any = source
        where = source_name
    elif isinstance(source, str | os.PathLike):
        where = os.fspath(source)
        data = read_config_file(where)
    else:
        raise TypeError(f"load_config() takes a path or a mapping, not {type(source).__name__}")
    ctx = _Context(env, where)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SagaConfigError(
            where or "config", f"expected a mapping of sections at the top level, got {_describe(data)}"
        )
    config = _section(SagaConfig, data, "", ctx, exclude=("source",))
    _check_cross_field(config, data, ctx)
    return dataclasses.replace(config, source=where)


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file (safe loader: no Python objects). Raises `SagaConfigError` naming the file."""
    where = os.fspath(path)
    try:
        text = Path(where).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SagaConfigError(where, "configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SagaConfigError(where, f"cannot read the configuration file ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SagaConfigError(where, f"invalid YAML{at}: {problem}") from None


def interpolate(value: str, key: str, *, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` / ``${NAME:default}`` references and ``$$`` in ``value``.

    Raises:
        SagaConfigError: A variable without default is not set, or a reference is malformed.
    """
    return _interpolate(value, key, _Context(os.environ if environ is None else environ, None))


# -- interpolation ------------------------------------------------------------------------------------


def _interpolate(value: str, key: str, ctx: _Context) -> str:
    if "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        body = match.group(2)
        if body is None:
            raise ctx.error(key, f"unterminated '${{' in {value!r}")
        name, has_default, default = body.partition(":")
        if not _ENV_NAME.fullmatch(name):
            raise ctx.error(
                key, f"invalid environment reference '${{{body}}}' (write ${{NAME}} or ${{NAME:default}})"
            )
        found = ctx.environ.get(name)
        if found is not None:
            return found
        if has_default:
            return default
        raise ctx.error(key, f"environment variable {name} is not set and has no default")

    return _Interpolated(_REFERENCE.sub(replace, value))


# -- validation ---------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _suggest(word: str, choices: typing.Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(name: Any, valid: list[str]) -> str:
    if not isinstance(name, str):
        return f"unknown key {name!r} (keys are names such as {', '.join(map(repr, valid[:3]))})"
    suggestion = _suggest(name, valid)
    if suggestion is not None:
        return f"unknown key (did you mean {suggestion!r}?)"
    return f"unknown key (valid keys: {', '.join(valid)})"


_T = typing.TypeVar("_T")


def _section(cls: type[_T], data: Any, prefix: str, ctx: _Context, *, exclude: tuple[str, ...] = ()) -> _T:
    """Validate the mapping ``data`` against dataclass ``cls`` and build it (defaults for absent keys)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ctx.error(prefix, f"expected a mapping of keys, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]  # type: ignore[arg-type]
    names = [f.name for f in fields]
    for name in data:
        if name not in names:
            raise ctx.error(_join(prefix, str(name)), _unknown_key(name, names))
    values: dict[str, Any] = {}
    for f in fields:
        if f.name in data:
            values[f.name] = _value(data[f.name], hints[f.name], _join(prefix, f.name), ctx)
    if cls is KafkaSettings:
        return _kafka_settings(values, prefix, ctx)  # type: ignore[return-value]
    return cls(**values)


def _kafka_settings(values: dict[str, Any], prefix: str, ctx: _Context) -> KafkaSettings:
    try:
        return KafkaSettings(**values)
    except BrokerConfigError as exc:
        name = exc.field
        if name is None:
            raise ctx.error(prefix, str(exc)) from None
        problem = str(exc).removeprefix(f"KafkaSettings.{name} ")
        raise ctx.error(_join(prefix, name), problem) from None


def _value(raw: Any, tp: Any, key: str, ctx: _Context) -> Any:
    origin = get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0] if len(args) == 1 else tp
        origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _section(tp, raw, key, ctx)  # type: ignore[arg-type]
    if isinstance(raw, str):
        raw = _interpolate(raw, key, ctx)
    if origin is tuple:
        return () if raw is None else _string_list(raw, key, ctx)
    if raw is None or (isinstance(raw, _Interpolated) and raw == "" and (optional or tp is not str)):
        if optional:
            return None
        raise ctx.error(key, "missing value")
    if origin is Literal:
        return _choice(raw, get_args(tp), key, ctx)
    if tp is str:
        if not isinstance(raw, str):
            raise ctx.error(key, f"expected a string, got {_describe(raw)}")
        if raw == "" and not optional:
            raise ctx.error(key, "missing value")
        return str(raw)
    value = _scalar(raw, tp, key, ctx)
    if isinstance(value, float) and not math.isfinite(value):
        raise ctx.error(key, f"must be a finite number, got {_describe(value)}")
    minimum = _MINIMUMS.get(key)
    if minimum is not None:
        bound, inclusive = minimum
        if value < bound or (not inclusive and value == bound):
            shown = int(bound) if float(bound).is_integer() else bound
            rule = f"at least {shown}" if inclusive else f"greater than {shown}"
            raise ctx.error(key, f"must be {rule}, got {value!r}")
    maximum = _MAXIMUMS.get(key)
    if maximum is not None and value > maximum:
        shown = int(maximum) if float(maximum).is_integer() else maximum
        raise ctx.error(key, f"must be at most {shown}, got {value!r}")
    return value


def _scalar(raw: Any, tp: Any, key: str, ctx: _Context) -> Any:
    if isinstance(raw, _Interpolated):
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        if isinstance(parsed, bool | int | float):
            raw = parsed
    if tp is not bool and isinstance(raw, str) and _YAML12_NUMBER.fullmatch(raw):
        raw = float(raw)  # YAML 1.2 reads 1e12 as a number; PyYAML (YAML 1.1) leaves it a string
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        raise ctx.error(key, f"expected true or false, got {_describe(raw)}")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
            return int(raw)
        raise ctx.error(key, f"expected an integer, got {_describe(raw)}")
    if tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        raise ctx.error(key, f"expected a number, got {_describe(raw)}")
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - schema bug


def _string_list(raw: Any, key: str, ctx: _Context) -> tuple[str, ...]:
    if isinstance(raw, str):
        # A single reference may carry a comma-separated list: saga_names: ${RECOVER_SAGAS:}
        if isinstance(raw, _Interpolated):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        raise ctx.error(key, f"expected a list of strings, got {_describe(raw)}")
    if not isinstance(raw, list | tuple):
        raise ctx.error(key, f"expected a list of strings, got {_describe(raw)}")
    items: list[str] = []
    for index, item in enumerate(raw):
        item_key = f"{key}[{index}]"
        if isinstance(item, str):
            item = _interpolate(item, item_key, ctx)
        if not isinstance(item, str) or item == "":
            problem = "missing value" if item in (None, "") else f"expected a string, got {_describe(item)}"
            raise ctx.error(item_key, problem)
        items.append(str(item))
    return tuple(items)


def _choice(raw: Any, choices: tuple[Any, ...], key: str, ctx: _Context) -> Any:
    if raw in choices:
        return str(raw)
    listed = ", ".join(repr(c) for c in choices)
    problem = f"expected one of {listed}, got {_describe(raw)}"
    if isinstance(raw, str):
        suggestion = _suggest(raw, [str(c) for c in choices])
        if suggestion is not None:
            problem += f" (did you mean {suggestion!r}?)"
    raise ctx.error(key, problem)


# -- rules that span keys or need more than a type -----------------------------------------------------


def _check_cross_field(config: SagaConfig, data: Mapping[str, Any], ctx: _Context) -> None:
    if not _TOPIC_NAME.fullmatch(config.service.name):
        raise ctx.error(
            "service.name",
            f"{config.service.name!r} cannot be part of a topic name (use letters, digits, '.', '_', '-')",
        )
    for name in ("reply", "dead_letter"):
        topic = getattr(config.topics, name)
        if topic is not None and not _TOPIC_NAME.fullmatch(topic):
            raise ctx.error(
                f"topics.{name}", f"{topic!r} is not a valid topic name (use letters, digits, '.', '_', '-')"
            )
    if config.broker.type == "kafka":
        broker = data.get("broker") or {}
        kafka = broker.get("kafka") if isinstance(broker, Mapping) else None
        if not isinstance(kafka, Mapping) or kafka.get("bootstrap_servers") is None:
            raise ctx.error(
                "broker.kafka.bootstrap_servers", "missing value (required when broker.type is 'kafka')"
            )
    _check_storage_url(config.storage.url, ctx)
    if config.storage.schema is not None and not config.storage.url.startswith("postgresql"):
        raise ctx.error(
            "storage.schema", "is only supported with PostgreSQL (storage.url postgresql+asyncpg://...)"
        )
    for index, entry in enumerate(config.sagas):
        module, sep, attribute = entry.partition(":")
        if not sep or not _is_dotted_name(module) or not _is_dotted_name(attribute):
            raise ctx.error(f"sagas[{index}]", f"expected 'module:attribute', got {entry!r}")
    check_participant(config.participant, ctx.error)
    level = config.logging.level.upper()
    if level not in _LOG_LEVELS:
        raise ctx.error("logging.level", _choice_problem(config.logging.level, _LOG_LEVELS))
    fmt = config.logging.format
    if fmt not in ("text", "json") and "%(" not in fmt:
        raise ctx.error(
            "logging.format", f"expected 'text', 'json' or a logging format string with %(...)s, got {fmt!r}"
        )


def _choice_problem(raw: str, choices: tuple[str, ...]) -> str:
    problem = f"expected one of {', '.join(map(repr, choices))}, got {raw!r}"
    suggestion = _suggest(raw.upper(), choices)
    return problem + (f" (did you mean {suggestion!r}?)" if suggestion else "")


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _check_storage_url(url: str, ctx: _Context) -> None:
    from saga.config.model import MEMORY_STORAGE_URL

    if url == MEMORY_STORAGE_URL:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ctx.error(
            "storage.url", "not a database URL (expected e.g. postgresql+asyncpg://... or memory://)"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    async_drivers = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}
    if parsed.drivername.split("+")[0] in ("postgres", "pgsql"):
        # Heroku and libpq tools spell it postgres://; SQLAlchemy has no dialect of that name.
        raise ctx.error(
            "storage.url",
            f"{shown!r}: SQLAlchemy spells the scheme postgresql; use postgresql+asyncpg://"
            f"{shown.split('://', 1)[1]}",
        )
    try:
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    except NoSuchModuleError:
        raise ctx.error(
            "storage.url",
            f"unsupported database in {shown!r} (use postgresql+asyncpg://, sqlite+aiosqlite:/// or memory://)",
        ) from None
    if backend not in async_drivers:
        raise ctx.error(
            "storage.url",
            f"unsupported database {backend!r} in {shown!r} (use postgresql+asyncpg://, "
            "sqlite+aiosqlite:/// or memory://)",
        )
    if "+" not in parsed.drivername:
        raise ctx.error(
            "storage.url",
            f"{shown!r} names no driver; use {backend}+{async_drivers[backend]}:// (storage is asynchronous)",
        )
    if driver != async_drivers[backend]:
        raise ctx.error(
            "storage.url",
            f"{shown!r} uses the {driver!r} driver; use {backend}+{async_drivers[backend]}:// "
            "(storage is asynchronous)",
        )
