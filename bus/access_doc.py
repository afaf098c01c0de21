"""Regenerate the role × event-type table of ``docs/security.md``::

    python -m fedbus.bus.access_doc docs/security.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from .catalogue_cli import load_events
from .permissions import access_table, splice_table


def main(argv: list[str]) -> int:
    target = Path(argv[1] if len(argv) > 1 else "docs/security.md")
    target.write_text(splice_table(target.read_text(), access_table(load_events())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
