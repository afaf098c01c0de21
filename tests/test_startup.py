"""A fast start and a core install (issue 8, item 8): what ``fedbus --help``, ``fedbus tail`` and
``import fedbus.bus`` load, and that the commands work without the ``ml`` extra.

Every check runs in a fresh interpreter and looks at ``sys.modules``, never at a clock. "Without the ml extra"
is a finder at the front of ``sys.meta_path`` that refuses numpy, scipy, scikit-learn, torch and onnx, as a
venv with only the core dependencies would: building such a venv here takes minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from pathlib import Path

from fedbus.aggregator.events import ModelRef, RoundStart
from fedbus.bus import connect
from fedbus.bus.broker import NatsServer
from fedbus.bus.cli import KNOWN_COMMANDS

WAIT = 30.0  # an upper bound on a loaded 2-core machine; nothing waits this long when things work
HEAVY = ("numpy", "torch", "scipy", "sklearn", "aiohttp")
ML_EXTRA = ("numpy", "scipy", "sklearn", "torch", "onnx", "onnxruntime")
MARK = "@@startup-modules@@"

# Prepended to a script: the named modules (and all of a named top-level package) cannot be imported, as if
# they were not installed.
_BLOCK = """
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {blocked!r} or name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""

# Runs the `fedbus` command in this interpreter, then prints the top-level packages it imported.
_CLI = """
import json, sys
sys.argv = ["fedbus", *{args!r}]
from fedbus.bus.cli import main
try:
    main(prog_name="fedbus")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print({mark!r} + json.dumps(sorted({{m.partition(".")[0] for m in sys.modules}})), flush=True)
sys.exit(code)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FEDBUS_SERVER", "FEDBUS_CREDS")}


def _script(*args: str, blocked: tuple[str, ...] = ()) -> str:
    prelude = _BLOCK.format(blocked=set(blocked)) if blocked else ""
    return textwrap.dedent(prelude) + textwrap.dedent(_CLI.format(args=list(args), mark=MARK))


def fedbus(*args: str, blocked: tuple[str, ...] = ()) -> tuple[int, str, str, set[str]]:
    """``fedbus ARGS`` in a fresh interpreter: (exit code, stdout, stderr, top-level packages imported)."""
    result = subprocess.run([sys.executable, "-c", _script(*args, blocked=blocked)], capture_output=True,
                            text=True, timeout=WAIT, env=_env(), check=False)
    out, _, modules = result.stdout.rpartition(MARK)
    assert modules, f"the script did not finish: {result.stdout}{result.stderr}"
    return result.returncode, out, result.stderr, set(json.loads(modules))


def python(code: str, *, blocked: tuple[str, ...] = ()) -> set[str]:
    """Run ``code`` in a fresh interpreter; the top-level packages it imported."""
    prelude = _BLOCK.format(blocked=set(blocked)) if blocked else ""
    script = (textwrap.dedent(prelude) + textwrap.dedent(code)
              + f"\nimport json, sys\nprint({MARK!r} + json.dumps(sorted({{m.partition('.')[0] "
                f"for m in sys.modules}})))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT,
                            env=_env(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return set(json.loads(result.stdout.rpartition(MARK)[2]))


# -- what starting loads ---------------------------------------------------------------------------------
def test_fedbus_help_lists_every_command_without_importing_heavy_libraries() -> None:
    code, out, err, modules = fedbus("--help")
    assert code == 0, err
    for command in ("tail", "publish", "up", "creds", "launch", "jobs", "agent", "fl", "dead-letters"):
        assert f"\n  {command} " in out, f"{command} missing from:\n{out}"
    assert err == ""
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))
    assert "fedbus" in modules  # the probe does see what was imported


def test_tail_help_imports_no_heavy_library() -> None:
    code, out, err, modules = fedbus("tail", "--help")
    assert code == 0, err
    assert "Decode every event on PATTERN" in out
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


def test_the_group_helps_of_the_ml_and_daemon_commands_import_no_heavy_library() -> None:
    for group, sub in (("fl", "run"), ("agent", "aggregator"), ("agent", "gpu")):
        code, out, err, modules = fedbus(group, sub, "--help")
        assert code == 0, err
        assert "CONFIG_PATH" in out or "--gpus" in out
        assert modules.isdisjoint(HEAVY), (group, sub, sorted(modules & set(HEAVY)))


def test_import_fedbus_bus_pulls_in_no_cli_and_no_ml() -> None:
    modules = python("import fedbus.bus")
    assert modules.isdisjoint({"click", *HEAVY}), sorted(modules & {"click", *HEAVY})
    assert "msgspec" in modules  # the probe does see what was imported


def test_import_fedbus_bus_works_without_rich_and_click() -> None:
    # structlog imports rich when it is installed (for pretty tracebacks); fedbus.bus itself needs neither.
    modules = python("import fedbus.bus\nfrom fedbus.bus import Bus, connect", blocked=("rich", "click"))
    assert modules.isdisjoint({"rich", "click"})


def test_decoding_an_fl_event_needs_neither_numpy_nor_torch() -> None:
    code = """
        from fedbus.aggregator.events import ModelRef, RoundStart
        from fedbus.bus.codec import Codec
        from fedbus.bus.render import frame_record

        codec = Codec()
        event = RoundStart(run_id="r1", round=3, kind="fit", version=2, deadline_s=5.0,
                           model=ModelRef(sha256="0" * 64, length=10))
        record = frame_record(event.subject(), codec.pack(codec.envelope(event, source="agg")), codec)
        assert record["type"] == "fl.round_start" and record["data"]["round"] == 3, record
    """
    modules = python(code)
    assert modules.isdisjoint({"numpy", "torch"}), sorted(modules & {"numpy", "torch"})
    python(code, blocked=ML_EXTRA)  # and on a core install


def test_the_table_of_known_commands_matches_the_commands_themselves() -> None:
    # `fedbus --help` lists KNOWN_COMMANDS without importing the command modules: it must say what they say.
    found: dict[str, tuple[tuple[str, ...], str]] = {}
    for ep in sorted(entry_points(group="fedbus.cli"), key=lambda e: e.name):
        for command in ep.load():
            assert command.name is not None
            first = " ".join((command.help or "").partition("\n\n")[0].split())
            packages, text = found.get(command.name, ((), first))
            found[command.name] = ((*packages, ep.name), text)
    assert found == KNOWN_COMMANDS


def test_help_from_the_table_is_the_help_of_the_loaded_commands() -> None:
    script = textwrap.dedent("""
        import click, json
        from fedbus.bus.cli import main
        ctx = click.Context(main, info_name="fedbus")
        lazy = main.get_help(ctx)
        loaded = {m for m in __import__("sys").modules if m.endswith(".commands")}
        main.get_command(ctx, "agent")  # loads the agents and aggregator commands
        main.get_command(ctx, "tail")
        print(json.dumps([lazy, main.get_help(ctx), sorted(loaded)]))
    """)
    for columns in ("60", "200"):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT,
                                env={**_env(), "COLUMNS": columns}, check=False)
        assert result.returncode == 0, result.stderr
        lazy, loaded, modules = json.loads(result.stdout)
        assert modules == []  # the first help came from the table alone
        assert lazy == loaded and "\n  tail " in lazy


def test_tail_loads_the_bus_commands_alone() -> None:
    probe = python(textwrap.dedent("""
        import sys
        sys.argv = ["fedbus", "tail", "--help"]
        from fedbus.bus.cli import main
        try:
            main(prog_name="fedbus")
        except SystemExit:
            pass
        assert "fedbus.bus.commands" in sys.modules
        assert "fedbus.agents.commands" not in sys.modules and "fedbus.aggregator.commands" not in sys.modules
    """))
    assert "fedbus" in probe


# -- a core install: no ml extra ---------------------------------------------------------------------------
def test_without_the_ml_extra_every_command_is_listed_and_nothing_warns() -> None:
    for args in (("--help",), ("tail", "--help"), ("fl", "--help"), ("agent", "--help"), ("launch", "--help")):
        code, out, err, _ = fedbus(*args, blocked=ML_EXTRA)
        assert code == 0, (args, err)
        assert err == "", (args, err)  # no "commands are unavailable", no "pip install 'fedbus[ml]'"
    code, out, err, _ = fedbus("--help", blocked=ML_EXTRA)
    assert "\n  fl " in out and "\n  agent " in out


def test_without_the_ml_extra_events_lists_the_fl_events() -> None:
    code, out, err, _ = fedbus("events", "fl.", "--json", blocked=ML_EXTRA)
    assert code == 0, err
    types = {info["type"] for info in json.loads(out)}
    assert {"fl.round_start", "fl.update", "fl.join"} <= types, types
    assert "ml" not in err


def test_without_the_ml_extra_a_training_command_says_so_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "fl.yaml"
    config.write_text("run_id: r1\n")
    for args in (("fl", "run", str(config), "--simulate", "2"), ("fl", "client", str(config), "--index", "0"),
                 ("agent", "aggregator", str(config))):
        code, out, err, _ = fedbus(*args, blocked=ML_EXTRA)
        assert code == 2, (args, code, out, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "pip install 'fedbus[ml]'" in err and "numpy" in err, err


@asynccontextmanager
async def _started(script: str, server: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                env={**_env(), "FEDBUS_SERVER": server})
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_without_the_ml_extra_tail_decodes_fl_events(nats_server: NatsServer) -> None:
    pattern = RoundStart.pattern("startup-run")
    script = _script("tail", pattern, "--json", "--count", "1", "--timeout", str(WAIT), blocked=ML_EXTRA)
    async with _started(script, nats_server.url) as tail:
        assert tail.stderr is not None and tail.stdout is not None
        ready = await asyncio.wait_for(tail.stderr.readline(), WAIT)
        assert b"listening on" in ready, ready  # the first line on stderr: no warning before it
        async with connect(nats_server.url, source="agg-startup") as bus:
            sent = await bus.publish(RoundStart(run_id="startup-run", round=1, kind="fit", version=0,
                                                deadline_s=5.0, model=ModelRef(sha256="a" * 64, length=4)))
        out = (await asyncio.wait_for(tail.stdout.read(), WAIT)).decode()
        err = (await asyncio.wait_for(tail.stderr.read(), WAIT)).decode()
        assert await asyncio.wait_for(tail.wait(), WAIT) == 0, err
    record = json.loads(out.rpartition(MARK)[0].strip())
    assert record["id"] == sent.id and record["type"] == "fl.round_start", record
    assert record["data"]["run_id"] == "startup-run" and record["data"]["model"]["length"] == 4
    assert "known" not in record and "error" not in record  # decoded with its schema, not as raw msgpack
    assert set(json.loads(out.rpartition(MARK)[2])).isdisjoint(ML_EXTRA)
    assert err == ""


def test_a_package_whose_commands_cannot_load_is_named_only_by_a_command_it_holds() -> None:
    broken = ("fedbus.aggregator.commands",)
    for args in (("--help",), ("tail", "--help"), ("agent", "gpu", "--help")):
        code, _out, err, _ = fedbus(*args, blocked=broken)
        assert code == 0 and err == "", (args, err)
    code, _out, err, _ = fedbus("fl", "--help", blocked=broken)
    assert code == 2
    assert "No such command 'fl'" in err and "the aggregator commands are unavailable" in err, err
