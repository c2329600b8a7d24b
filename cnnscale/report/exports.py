"""Report exports: flat rows as CSV (for pandas) and JSON, the rendered console as SVG (the web page is
:mod:`cnnscale.report.html`).

Written atomically where the user asked, never into a run directory, readable as the user's umask allows (0644
typically; a plain atomic write would leave mkstemp's 0600).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from cnnscale.records.io import atomic_write_text, finite, user_file_mode
from cnnscale.report.aggregate import COLUMNS

__all__ = ["write_csv", "write_json_rows", "write_svg"]


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: r.get(c) for c in COLUMNS} for r in rows]


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One line per row, the columns of :data:`cnnscale.report.aggregate.COLUMNS` (``suspect`` as
    ``figure: reason; ...``, empty when none)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows({**r, "suspect": "; ".join(f"{k}: {v}" for k, v in (r["suspect"] or {}).items())}
                for r in _flat(rows))
    atomic_write_text(path, buf.getvalue(), mode=user_file_mode())


def write_json_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The rows as a JSON list of objects (NaN and infinity as null)."""
    atomic_write_text(path, json.dumps(finite(_flat(rows)), indent=2, allow_nan=False) + "\n", mode=user_file_mode())


def write_svg(console: Console, path: str | Path) -> None:
    """What ``console`` recorded, as an SVG image."""
    atomic_write_text(path, console.export_svg(title="cnnscale report", clear=False), mode=user_file_mode())
