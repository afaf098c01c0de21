"""The limits file: YAML read into a :class:`~fedbus.bus.limits.StorageLimits` and written back.

::

    streams:
      FEDBUS_JOBS: {max_bytes: 2GiB, max_age: 60d}   # fields not given keep their built-in values
      default: {max_msg_size: 256KiB}                # streams without an entry of their own
    kv:
      jobs: {max_bytes: 1GiB}
    objects:
      fl: {max_bytes: 100GiB}

Sizes are bytes or ``512KiB``/``256MiB``/``1GiB`` (``KB``/``MB``/``GB`` are powers of 1000); durations are
seconds or ``90s``/``10m``/``12h``/``30d``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError
from .limits import DAY, BucketLimits, GiB, KiB, MiB, ObjectLimits, StorageLimits, StreamLimits

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*")
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_SIZE_FIELDS = {"max_bytes", "max_msg_size", "max_value_size", "max_chunk_size"}
_AGE_FIELDS = {"max_age", "ttl"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}").fullmatch
_SECTIONS = {"streams": StreamLimits, "kv": BucketLimits, "objects": ObjectLimits}
L = TypeVar("L", StreamLimits, BucketLimits, ObjectLimits)


def _size(value: Any, key: str, source: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"not a size: {value!r} (bytes, or like 512KiB, 256MiB, 1GiB)", key=key, source=source)
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def _age(value: Any, key: str, source: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _AGE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"not a duration: {value!r} (seconds, or like 90s, 10m, 12h, 30d)", key=key,
                          source=source)
    return float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]


def _entry(base: L, data: Any, key: str, source: str) -> L:
    """``base`` with the fields ``data`` sets (sizes and durations may be written with units)."""
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping of limits", key=key, source=source)
    known = {f.name for f in fields(base)}
    changes: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{key}.{name}"
        if name not in known:
            raise ConfigError(f"unknown limit (known: {', '.join(sorted(known))})", key=where, source=source)
        if name in _SIZE_FIELDS or name in ("max_msgs", "max_msgs_per_subject"):
            changes[name] = _size(value, where, source)
        elif name in _AGE_FIELDS:
            changes[name] = _age(value, where, source)
        else:
            changes[name] = value
    try:
        return replace(base, **changes)
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1], key=f"{key}.{exc.key}", source=source) from None
    except TypeError as exc:
        raise ConfigError(str(exc), key=key, source=source) from None


def parse(data: Any, *, source: str = "<limits>") -> StorageLimits:
    """Limits from parsed YAML: each entry overrides the built-in one field by field; ``default`` in a
    section sets the limits of that section's unnamed streams or buckets."""
    base = StorageLimits()
    if data is None:
        return base
    if not isinstance(data, dict):
        raise ConfigError("the limits file must be a mapping with streams, kv and objects", source=source)
    out: dict[str, Any] = {}
    for section, entries in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section (known: {', '.join(_SECTIONS)})", key=str(section), source=source)
        if not isinstance(entries, dict):
            raise ConfigError("must be a mapping of names to limits", key=section, source=source)
        named = dict(getattr(base, section))
        default = getattr(base, f"default_{'stream' if section == 'streams' else section}")
        if "default" in entries:
            default = _entry(default, entries["default"], f"{section}.default", source)
        for name, entry in entries.items():
            if name == "default":
                continue
            if not isinstance(name, str) or not _NAME(name):
                raise ConfigError("a name is letters, digits, '_' and '-'", key=f"{section}.{name}", source=source)
            named[name] = _entry(named.get(name, default), entry, f"{section}.{name}", source)
        out[section] = named
        out[f"default_{'stream' if section == 'streams' else section}"] = default
    return replace(base, **out)


def load(path: str | Path | None) -> StorageLimits:
    """The limits in the YAML file at ``path`` (over the built-in defaults), or the defaults for ``None``."""
    if path is None:
        return StorageLimits()
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the limits file: {exc.strerror or exc}", source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    return parse(data, source=source)


def _human_size(n: int) -> int | str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return n


def _human_age(seconds: float) -> float | str:
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return seconds


def _plain(limits: StreamLimits | BucketLimits | ObjectLimits) -> dict[str, Any]:
    return {k: _human_size(v) if k in _SIZE_FIELDS else _human_age(v) if k in _AGE_FIELDS else v
            for k, v in asdict(limits).items()}


def render(limits: StorageLimits) -> str:
    """``limits`` as a YAML limits file (what :func:`load` reads back to equal limits)."""
    doc = {
        "streams": {"default": _plain(limits.default_stream), **{k: _plain(v) for k, v in limits.streams.items()}},
        "kv": {"default": _plain(limits.default_kv), **{k: _plain(v) for k, v in limits.kv.items()}},
        "objects": {"default": _plain(limits.default_objects),
                    **{k: _plain(v) for k, v in limits.objects.items()}},
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
