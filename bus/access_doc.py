"""Regenerate the role × event-type table of ``docs/security.md``::

    python -m fedbus.bus.access_doc docs/security.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from .catalogue_cli import load_events
from .events import Event
from .permissions import access_table, splice_table


def project_events() -> list[type[Event]]:
    """The event types fedbus's own packages declare (not those a test or a benchmark made up)."""
    return [c for c in load_events() if c.__module__.startswith("fedbus.")]


def main(argv: list[str]) -> int:
    target = Path(argv[1] if len(argv) > 1 else "docs/security.md")
    target.write_text(splice_table(target.read_text(), access_table(project_events())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
