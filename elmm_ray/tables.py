"""Plain-text tables for the summaries every stage prints."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str] | None = None,
                 title: str = "") -> str:
    """Left-aligned first column, right-aligned others; a rule under the headers."""
    cells = [[str(c) for c in r] for r in rows]
    if headers:
        cells.insert(0, [str(h) for h in headers])
    if not cells:
        return title
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]

    def line(r: list[str]) -> str:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    for i, r in enumerate(cells):
        out.append(line(r))
        if headers and i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
