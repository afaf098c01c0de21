"""A plain-text table, so every benchmark prints the same way (and the output pastes into issues)."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\n{title}")
    print(line)
    for i, row in enumerate(cells):
        print("|".join(f" {c:<{w}} " for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print(line)
    print(line)
