"""``cnnscale report --html FILE``: one self-contained web page that opens offline.

The verdicts; real ``<table>``s (the same column specs as the terminal, :mod:`cnnscale.report.columns`, all
columns whatever the width), with the plots inline as base64 PNG after the scaling table; the prediction table,
memory by ZeRO stage, failures and warnings, and the study's configuration and environment (versions, devices, git
sha) as the records state them.
No script, no external stylesheet, font or image. Pure: the figures come in as PNG bytes, so this module needs
neither matplotlib nor torch.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

import yaml

from cnnscale.records.io import atomic_write_text, user_file_mode
from cnnscale.records.run import Run, load_run
from cnnscale.report.columns import SUSPECT, Column, TableSpec, display_rows, footnotes, memory_table, table_specs
from cnnscale.report.tables import (
    MEMORY_CAPTION,
    MEMORY_HEADS,
    PREDICT_CAPTION,
    PREDICT_HEADS,
    TITLE,
    memory_cells,
    predict_cells,
)
from cnnscale.report.verdicts import verdicts

__all__ = ["page", "write_page", "ENV_KEYS"]

ENV_KEYS = ("device_type", "device_name", "device_count", "cuda", "cudnn", "backend", "distributed_type", "host",
            "num_nodes", "cpu_count", "torch_threads", "python", "platform", "git_sha", "peak_tflops", "peak_source",
            "nvml")
"""env.json fields shown in the environment section (each with every distinct value across the runs)."""

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #eee; white-space: nowrap; }
thead th { border-bottom: 2px solid #999; text-align: right; vertical-align: bottom; }
thead th.left, td.left { text-align: left; } td { text-align: right; }
tr.model th { text-align: left; background: #f3f3f3; padding-top: 0.4em; }
td.failed { color: #b00020; font-weight: 600; }
p.caption { color: #555; font-size: 0.9em; max-width: 60em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
li { margin: 0.3em 0; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.warn { color: #8a6d00; } .err { color: #b00020; } td.suspect, li.suspect { color: #8a6d00; font-style: italic; }
"""


def _head(text: str) -> str:
    return escape(text.replace("\n", " "))


def _cls(*names: str) -> str:
    """`` class="a b"`` of the non-empty names, or nothing."""
    names = tuple(n for n in names if n)
    return f' class="{" ".join(names)}"' if names else ""


def _td(col: Column, row: dict[str, Any]) -> str:
    text = col.cell(row)
    failed = row["status"] != "ok" and text.isupper()
    flag = "suspect" if text == SUSPECT else ""
    title = f' title="{escape(row["suspect"][col.key])}"' if flag and col.key in row.get("suspect", {}) else ""
    return f"<td{_cls('left' if col.left else '', 'failed' if failed else '', flag)}{title}>{escape(text)}</td>"


def _table(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    shown = [r for r in rows if spec.failed_rows or r["status"] == "ok"]
    heads = "".join(f"<th{_cls('left' if c.left else '')}>{_head(c.header)}</th>" for c in spec.columns)
    body = []
    for label, r in display_rows(shown):
        if r is None:
            body.append(f'<tr class="model"><th colspan="{len(spec.columns) + 1}">{escape(label)}</th></tr>')
            continue
        cells = "".join(_td(c, r) for c in spec.columns)
        body.append(f'<tr><td class="left">{escape(label.strip())}</td>{cells}</tr>')
    notes = "".join(f'<li class="suspect">{escape(n)}</li>' for n in footnotes(spec, rows))
    return (f'<h2>{escape(spec.title)}</h2>\n<table id="table-{spec.name}"><thead><tr><th class="left">model</th>'
            f"{heads}</tr></thead>\n<tbody>{''.join(body)}</tbody></table>\n"
            f'<p class="caption">{escape(spec.caption)}</p>\n'
            + (f'<ul class="footnotes" id="suspect-{spec.name}">{notes}</ul>\n' if notes else ""))


def _plain_table(table_id: str, title: str, caption: str, heads: list[tuple[str, bool, int]],
                 cells: list[list[str]]) -> str:
    th = "".join(f"<th{_cls('left' if left else '')}>{_head(h)}</th>" for h, left, _ in heads)
    body = "".join("<tr>" + "".join(f"<td{_cls('left' if heads[i][1] else '')}>{escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in cells)
    return (f'<h2>{escape(title)}</h2>\n<table id="{table_id}"><thead><tr>{th}</tr></thead>\n<tbody>{body}</tbody>'
            f'</table>\n<p class="caption">{escape(caption)}</p>\n')


def _figures(pngs: dict[str, bytes]) -> str:
    out = ["<h2>plots</h2>"]
    for name, data in pngs.items():
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        out.append(f'<figure><img src="{src}" alt="{escape(name)}"><figcaption>{escape(name)}</figcaption></figure>')
    return "\n".join(out) + "\n"


def _environment(runs: list[Run]) -> str:
    """Every distinct value of :data:`ENV_KEYS` and of each package version across the runs, and one config."""
    values: dict[str, list[str]] = {}
    for run in runs:
        env = run.env.to_dict()
        items = [(k, env.get(k)) for k in ENV_KEYS] + sorted((env.get("versions") or {}).items())
        for k, v in items:
            if v is not None and str(v) not in values.setdefault(k, []):
                values[k].append(str(v))
    rows = "".join(f"<tr><td class=\"left\">{escape(k)}</td><td class=\"left\">{escape(', '.join(v))}</td></tr>"
                   for k, v in values.items() if v)
    studies = sorted({r.point.study for r in runs if r.point is not None and r.point.study})
    first = next((r.path for r in runs if r.config), None)
    config = load_run(first).config if first else {}  # the whole file: the report loads only its dist section
    return ("<h2>configuration and environment</h2>\n"
            + (f"<p>studies: {escape(', '.join(studies))}</p>\n" if studies else "")
            + f'<table id="environment"><thead><tr><th class="left">env.json</th><th class="left">values across the '
            f"runs</th></tr></thead><tbody>{rows}</tbody></table>\n"
            f"<p>config.yaml of {escape(Path(first or '-').name)} (every run's "
            f"is in its directory):</p>\n<pre>{escape(yaml.safe_dump(config, sort_keys=False))}</pre>\n")


def page(rows: list[dict[str, Any]], runs: list[Run], pngs: dict[str, bytes] | None = None,
         prows: list[dict[str, Any]] | None = None, warnings: list[str] | None = None) -> str:
    """The report as one HTML document (see the module docstring)."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{TITLE}</title>"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{_CSS}</style></head>"
             f"<body>\n<h1>{TITLE}</h1>\n<p>{len(runs)} runs.</p>\n"]
    found = verdicts(rows)
    if found:
        parts.append('<h2>why each model scales as it does</h2>\n<ul id="verdicts">'
                     + "".join(f"<li>{escape(v.text)}</li>" for v in found) + "</ul>\n")
    scaling, *others = table_specs(rows)
    parts.append(_table(scaling, rows))
    if pngs:
        parts.append(_figures(pngs))
    parts += [_table(spec, rows) for spec in others]
    zero = memory_table(runs)
    if zero:
        parts.append(_plain_table("table-memory", "memory per rank by ZeRO stage", MEMORY_CAPTION, MEMORY_HEADS,
                                  [memory_cells(r) for r in zero]))
    if prows:
        parts.append(_plain_table("table-predict", "scaling model: predicted weak-scaling efficiency",
                                  PREDICT_CAPTION, PREDICT_HEADS, [predict_cells(r) for r in prows]))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed or warnings:
        parts.append("<h2>failures and warnings</h2>\n<ul>"
                     + "".join(f'<li class="err">{escape(r["status"])} {escape(Path(r["run"]).name)}: '
                               f"{escape(r.get('error') or 'no error line')}</li>" for r in failed)
                     + "".join(f'<li class="warn">{escape(w)}</li>' for w in warnings or []) + "</ul>\n")
    parts.append(_environment(runs))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_page(path: str | Path, rows: list[dict[str, Any]], runs: list[Run], pngs: dict[str, bytes] | None = None,
               prows: list[dict[str, Any]] | None = None, warnings: list[str] | None = None) -> Path:
    """Write :func:`page` to ``path`` atomically, readable as the user's umask allows (0644 typically)."""
    atomic_write_text(path, page(rows, runs, pngs, prows, warnings), mode=user_file_mode())
    return Path(path)
