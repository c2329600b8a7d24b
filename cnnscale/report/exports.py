"""Report exports: flat rows as CSV (for pandas) and JSON, the rendered console as HTML and SVG.

Written atomically where the user asked; never into a run directory.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from cnnscale.records.io import atomic_write_text, finite
from cnnscale.report.aggregate import COLUMNS

__all__ = ["write_csv", "write_json_rows", "write_html", "write_svg"]


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: r.get(c) for c in COLUMNS} for r in rows]


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One line per row, the columns of :data:`cnnscale.report.aggregate.COLUMNS`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(_flat(rows))
    atomic_write_text(path, buf.getvalue())


def write_json_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The rows as a JSON list of objects (NaN and infinity as null)."""
    atomic_write_text(path, json.dumps(finite(_flat(rows)), indent=2, allow_nan=False) + "\n")


def write_html(console: Console, path: str | Path) -> None:
    """What ``console`` recorded, as a standalone HTML page."""
    atomic_write_text(path, console.export_html(clear=False))


def write_svg(console: Console, path: str | Path) -> None:
    """What ``console`` recorded, as an SVG image."""
    atomic_write_text(path, console.export_svg(title="cnnscale report", clear=False))
