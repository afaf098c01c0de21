"""Where and as whom a job runs: its user, its work dir, and an environment without the agent's secrets.

- :class:`JobUser`: when the agent runs as root, jobs run as an unprivileged user (``--job-user``, default
  ``nobody``); otherwise as the agent's own user (a process cannot switch users without root).
- :class:`WorkRoot`: the folder job work dirs live in, outside the agent's state dir (default
  ``<tmp>/fedbus-jobs-<agent id>-<6 hex of the state dir's path>``), locked like the state dir. It is ours
  (not a symlink, owned by the agent, ``0711``: job users can reach their own dir but not list the others),
  marked by a ``.fedbus-work-dir`` file so that cleaning it on start can never wipe a folder that was not
  made for jobs. Each job dir is ``0700`` and owned by the job's user.
- :func:`scrub_env`: the agent's environment minus anything secret: ``FEDBUS_*`` (``FEDBUS_CREDS``,
  contexts; the agent sets the job's own ``FEDBUS_*`` variables itself), variables named like secrets
  (``*_PASSWORD``, ``*_TOKEN``, ``*_SECRET``, ``*_KEY``, ``*_CREDENTIALS``), agent sockets, ``XDG_*`` (the
  agent's config dirs hold its context), and any variable whose value points into the agent's state dir or
  at its creds file.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from fedbus.bus.errors import ConfigError

from .statedir import StateLock

__all__ = ["JobUser", "WorkRoot", "scrub_env"]

log = structlog.get_logger("fedbus.agents.jobhost")

_SECRET_NAME = re.compile(r"(^|_)(PASSWORD|PASSWD|TOKEN|SECRET|KEY|CREDENTIALS|CREDS)$", re.IGNORECASE)
_KEEP_FEDBUS = frozenset({"FEDBUS_LOG_LEVEL"})
"""The only ``FEDBUS_*`` variables a job inherits; the agent sets the documented job ones itself."""
_DROP = frozenset({"SSH_AUTH_SOCK", "GPG_AGENT_INFO", "KRB5CCNAME", "DBUS_SESSION_BUS_ADDRESS",
                   "SUDO_COMMAND", "SUDO_USER", "SUDO_UID", "SUDO_GID", "MAIL", "XDG_RUNTIME_DIR"})
_JOB_DIR = re.compile(r"\.?[A-Za-z0-9_-]{1,64}-\d+(\.tar\.gz)?")
MARKER = ".fedbus-work-dir"


@dataclass(frozen=True, slots=True)
class JobUser:
    """The account job processes run as."""

    name: str
    uid: int
    gid: int
    home: str

    @property
    def switches(self) -> bool:
        """Whether the runner must change user (it differs from the agent's)."""
        return self.uid != os.geteuid()

    @classmethod
    def named(cls, name: str) -> JobUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"no such user {name!r}", key="job_user") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @classmethod
    def choose(cls, name: str | None) -> JobUser:
        """``name`` if given, else ``nobody`` when the agent is root, else the agent's own user."""
        root = os.geteuid() == 0
        user = cls.named(name or ("nobody" if root else pwd.getpwuid(os.geteuid()).pw_name))
        if user.switches and not root:
            raise ConfigError(f"running jobs as {user.name!r} needs the agent to run as root", key="job_user")
        if root and user.uid == 0:
            log.warning("jobs run as root: they can read the agent's key and credentials; use --job-user "
                        "with an unprivileged account")
        return user

    def env(self, workdir: Path) -> dict[str, str]:
        """``HOME``/``USER``/``LOGNAME`` for a job run as another user (``HOME`` is the work dir when that
        user's home is absent); nothing when the job runs as the agent's own user."""
        if not self.switches:
            return {}
        home = self.home if self.home and os.path.isdir(self.home) else str(workdir)
        return {"HOME": home, "USER": self.name, "LOGNAME": self.name}

    def can_enter(self, path: Path) -> bool:
        """Whether this user can reach into folder ``path`` (every folder on the way lets it through)."""
        if not self.switches:
            return os.access(path, os.X_OK)
        target = Path(os.path.realpath(path))
        return all(_allowed(folder, self, os.X_OK) for folder in (*target.parents, target))

    def can_run(self, path: str) -> bool:
        """Whether this user can probably reach and execute ``path`` (checked with the permission bits)."""
        target = Path(os.path.realpath(path))
        if not self.switches:
            return os.access(target, os.X_OK)
        return self.can_enter(target.parent) and _allowed(target, self, os.X_OK)


def _allowed(path: Path, user: JobUser, mode: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    bits = {os.R_OK: 4, os.W_OK: 2, os.X_OK: 1}[mode]
    if st.st_uid == user.uid:
        return bool(st.st_mode >> 6 & bits)
    if st.st_gid == user.gid:
        return bool(st.st_mode >> 3 & bits)
    return bool(st.st_mode & bits)


def scrub_env(environ: Mapping[str, str], *, secret_paths: Iterable[Path] = ()) -> dict[str, str]:
    """The agent's environment without its secrets (see the module docstring)."""
    paths = [str(Path(p).expanduser().resolve()) for p in secret_paths]
    kept = {}
    for name, value in environ.items():
        if name in _DROP or _SECRET_NAME.search(name):
            continue
        if name.startswith("FEDBUS_") and name not in _KEEP_FEDBUS or name.startswith("XDG_"):
            continue
        if any(p and p in value for p in paths):
            continue
        kept[name] = value
    return kept


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class WorkRoot:
    """The folder of job work dirs; see the module docstring."""

    def __init__(self, path: Path, *, state_dir: Path) -> None:
        self.path = Path(path).expanduser().absolute()
        state = Path(state_dir).expanduser().resolve()
        resolved = self.path.resolve()
        if _inside(resolved, state) or _inside(state, resolved):
            raise ConfigError(f"the work dir {self.path} must be outside the state dir {state} (jobs must not "
                              f"reach the agent's key)", key="work_dir")
        self._lock = StateLock(self.path, what="work dir", option="--work-dir")

    @staticmethod
    def default_path(agent_id: str, state_dir: Path) -> Path:
        """``<tmp>/fedbus-jobs-<agent id>-<6 hex of the state dir's path>``: one per state dir."""
        tag = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:6]
        return Path(tempfile.gettempdir()) / f"fedbus-jobs-{agent_id}-{tag}"

    def release(self) -> None:
        """Let another agent use the folder (idempotent)."""
        self._lock.release()

    def prepare(self, user: JobUser) -> None:
        """Create (or check) and lock the folder, then remove what jobs of a previous run left in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = False
        try:
            self.path.mkdir(mode=0o711)
            fresh = True
        except FileExistsError:
            pass
        st = self.path.lstat()
        if not self.path.is_dir() or self.path.is_symlink() or st.st_uid != os.geteuid():
            raise ConfigError(f"{self.path} is not a folder of this agent's user (a symlink, or someone "
                              f"else's); choose another --work-dir", key="work_dir")
        marker = self.path / MARKER
        if fresh:
            marker.write_text("job work dirs of a fedbus GPU agent; emptied when the agent starts\n")
        elif not marker.exists():
            if any(self.path.iterdir()):
                raise ConfigError(f"{self.path} is not empty and not a fedbus work dir; choose another "
                                  f"--work-dir", key="work_dir")
            marker.write_text("job work dirs of a fedbus GPU agent; emptied when the agent starts\n")
        self.path.chmod(0o711)
        if not user.can_enter(self.path):
            raise ConfigError(f"the job user {user.name!r} cannot reach {self.path} (a folder above it is closed "
                              f"to it); choose another --work-dir", key="work_dir")
        self._lock.acquire()
        for entry in self.path.iterdir():
            if _JOB_DIR.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def job_dir(self, job_id: str, attempt: int) -> Path:
        return self.path / f"{job_id}-{attempt}"

    def archive(self, job_id: str, attempt: int) -> Path:
        """Where the workspace archive of a job is downloaded (the agent's, never the job's)."""
        return self.path / f".{job_id}-{attempt}.tar.gz"

    def make_job_dir(self, job_id: str, attempt: int) -> Path:
        """A new, empty ``0700`` dir for one job attempt (a left-over one is removed first)."""
        path = self.job_dir(job_id, attempt)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        path.mkdir(mode=0o700)
        return path

    @staticmethod
    def hand_over(path: Path, user: JobUser) -> None:
        """Give a job dir and everything in it to the job's user (no symlink is followed)."""
        if not user.switches:
            return
        os.lchown(path, user.uid, user.gid)
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.lchown(os.path.join(folder, name), user.uid, user.gid)

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
