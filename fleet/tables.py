"""The CLI's plain-text tables: columns as wide as their widest cell, two spaces apart."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    """The rows under their headers, or ``empty`` when there are none."""
    if not rows:
        return empty
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
