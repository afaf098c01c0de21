"""Job files: YAML in the spirit of FedML's ``job.yaml``, parsed and validated in one place.

::

    name: hello
    workspace: .                  # folder shipped to the nodes (relative to this file)
    bootstrap: pip install -r requirements.txt
    job: |
      python train.py
    computing:
      nodes: 2                    # all-or-nothing: every node is placed, or none
      gpus_per_node: 1
      resource_type: A100         # GPU model must contain this (case-insensitive); omit for any
      min_memory_gb: 8            # free memory each node must have
      max_cost_per_hour: 4.0      # for the whole job (sum over nodes)
      labels: {zone: eu-west}
    env: {EPOCHS: 3}
    processes_per_node: 1         # copies of `job` per node (torchrun's nproc_per_node)
    retries: 2                    # re-runs after a lost node (and after a failure with retry_on_failure)

Errors are :class:`~fedbus.agents.errors.JobSpecError` naming the dotted key and the line, e.g.
``job.yaml:7: 'computing.nodes': Expected `int` >= 1``. FedML's ``minimum_num_gpus`` and
``maximum_cost_per_hour`` are accepted as aliases.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from .errors import JobSpecError

__all__ = ["Computing", "JobSpec", "LoadedJob", "load_jobspec", "parse_jobspec"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: FedML spellings accepted inside ``computing``.
_ALIASES = {
    "minimum_num_gpus": "gpus_per_node",
    "maximum_cost_per_hour": "max_cost_per_hour",
    "min_memory": "min_memory_gb",
}
_IGNORED_FEDML = {"device_type", "job_type", "job_subtype", "framework_type"}

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
#: Commands (``job``, ``bootstrap``): bounded, so that a job record stays well under a message's size.
Command = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Short = Annotated[str, msgspec.Meta(max_length=256)]
Labels = Annotated[dict[Short, Short], msgspec.Meta(max_length=64)]
Env = Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=32 * 1024)]], msgspec.Meta(max_length=512)]


class Computing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What each node of the job needs. A job with ``gpus_per_node: 0`` runs on CPU-only nodes too."""

    nodes: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    gpus_per_node: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    cpus_per_node: NonNegative = 1.0
    min_memory_gb: NonNegative = 0.0
    min_gpu_memory_gb: NonNegative = 0.0
    min_disk_gb: NonNegative = 0.0
    resource_type: Short | None = None
    max_cost_per_hour: NonNegative | None = None
    labels: Labels = {}


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A validated job. ``workspace`` is the packed archive's object name once submitted (the scheduler
    accepts only the job's own, :func:`fedbus.agents.workspace.object_name`)."""

    job: Command
    name: str = "job"
    workspace: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    bootstrap: Command | None = None
    computing: Computing = Computing()
    env: Env = {}
    processes_per_node: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Copies of ``job`` started on each node, torchrun-style (RANK, LOCAL_RANK, WORLD_SIZE differ)."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    retry_on_failure: bool = False
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if not self.job.strip():
            raise ValueError("`job` must be a non-empty shell command")
        if not _NAME.fullmatch(self.name):
            raise ValueError("`name` must be 1-40 letters, digits, '_' or '-'")
        for key in self.env:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"`env`: variable name {key!r} is not a valid shell name")


@dataclass(frozen=True, slots=True)
class LoadedJob:
    """A job file read from disk: its spec and the workspace folder to pack (if any)."""

    spec: JobSpec
    path: Path | None
    workspace_dir: Path | None


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping key, by dotted path."""


def _key_lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key, out)
    return out


def _normalise(data: dict[str, Any], lines: dict[str, int], source: str | None) -> dict[str, Any]:
    """Apply aliases, drop informational FedML keys, turn env scalars into strings."""
    data = dict(data)
    for key in _IGNORED_FEDML & data.keys():
        data.pop(key)
    computing = data.get("computing")
    if isinstance(computing, dict):
        computing = dict(computing)
        for alias, name in _ALIASES.items():
            if alias in computing:
                if name in computing:
                    raise JobSpecError(f"both {alias!r} and its alias target {name!r} are set",
                                       key=f"computing.{alias}", source=source,
                                       line=lines.get(f"computing.{alias}"))
                computing[name] = computing.pop(alias)
                lines[f"computing.{name}"] = lines.get(f"computing.{alias}", 0)
        for key in _IGNORED_FEDML & computing.keys():
            computing.pop(key)
        data["computing"] = computing
    env = data.get("env")
    if isinstance(env, dict):
        fixed: dict[Any, Any] = {}
        for key, value in env.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int | float):
                value = str(value)
            elif value is None:
                value = ""
            fixed[str(key)] = value
        data["env"] = fixed
    return data


def _explain(exc: msgspec.ValidationError, lines: dict[str, int], source: str | None) -> JobSpecError:
    message = str(exc)
    path = ""
    if " - at `$" in message:
        message, at = message.rsplit(" - at `$", 1)
        path = at.rstrip("`").lstrip(".").split("[", 1)[0]
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        field_name = unknown.group(1)
        key = f"{path}.{field_name}" if path else field_name
        known = (Computing if path == "computing" else JobSpec).__struct_fields__
        close = difflib.get_close_matches(field_name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"
        return JobSpecError(f"unknown key{hint}", key=key, source=source, line=lines.get(key))
    missing = re.match(r"Object missing required field `([^`]+)`", message)
    if missing:
        key = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return JobSpecError("required key is missing", key=key, source=source)
    named = re.match(r"`(\w+)`", message) if not path else None
    key = path or (named.group(1) if named else None)
    if named:
        message = message[named.end():].lstrip(": ") if message.startswith(f"`{key}`:") else message
    return JobSpecError(message, key=key, source=source, line=lines.get(key) if key else None)


def parse_jobspec(text: str, *, source: str | None = None) -> JobSpec:
    """Parse and validate job YAML; raises :class:`JobSpecError` pointing at the bad key and line."""
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise JobSpecError(f"not valid YAML: {exc.problem}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"not valid YAML: {exc}", source=source) from None
    if not isinstance(data, dict):
        raise JobSpecError("a job file must be a YAML mapping (key: value lines)", source=source, line=1)
    lines = _key_lines(node) if node is not None else {}
    data = _normalise(data, lines, source)
    try:
        return msgspec.convert(data, JobSpec)
    except msgspec.ValidationError as exc:
        raise _explain(exc, lines, source) from None


def load_jobspec(path: Path | str) -> LoadedJob:
    """Read a job file; the workspace is resolved relative to the file's folder and must exist."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise JobSpecError(f"cannot read the job file: {exc.strerror}", source=str(path)) from None
    spec = parse_jobspec(text, source=str(path))
    workspace_dir: Path | None = None
    if spec.workspace is not None:
        workspace_dir = (path.parent / spec.workspace).resolve()
        if not workspace_dir.is_dir():
            line = _key_lines(yaml.compose(text, Loader=_LineLoader)).get("workspace")
            raise JobSpecError(f"workspace folder {str(workspace_dir)!r} does not exist", key="workspace",
                               source=str(path), line=line)
    return LoadedJob(spec=spec, path=path, workspace_dir=workspace_dir)
