"""Why each model scales as it does: one or two sentences per model (and precision), computed from the rows alone.

For the model's default settings at its largest measured N, the efficiency lost against its baseline N0 is split
into parts, in points (100 x fraction). With ``u = N / img_per_s`` (seconds per image per worker, which is the step
time per image under weak scaling) and efficiency ``= u(N0) / u(N)``, the loss ``1 - eff = (u(N) - u(N0)) / u(N)``
is a sum of per-image time differences, each divided by ``u(N)``:

- **data wait**: the change in the data-wait share times u;
- **shared machine**: when the study has a ``compute_only`` run at the same N (the same launch, all-reduce skipped),
  the growth of everything but data wait from N0 to that run, i.e. what N processes sharing the machine cost each
  other; communication is then the rest, exposed all-reduce and its contention with the compute;
- without a compute_only run: **exposed communication** is the measured share (DDP's communication hook; the
  no_sync probe in runs before it), and the rest is
  **slower compute at N** (shared machine or stragglers, which that study cannot tell apart).

The second sentence compares every other settings variant of the same model and precision at the same N (a
gradient-compression hook, bigger buckets, accumulation...): the efficiency points it gained or lost and its img/s.
Pure: rows in, :class:`Verdict` out; nothing is written by hand but the sentence frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnscale.report.aggregate import group_key
from cnnscale.scaling.model import grad_bytes

__all__ = ["Verdict", "verdicts"]

_SKIP = ("compute_only", "probe")


@dataclass(frozen=True)
class Verdict:
    """A model's verdict: the numbers (points lost in ``lost_pts``, split in ``parts``; per settings variant the
    points gained at the same N in ``settings_pts``) and the ``text`` made of them."""

    model: str
    precision: str
    world_size: int | None
    efficiency: float | None
    lost_pts: float | None
    parts: dict[str, float] = field(default_factory=dict)
    settings_pts: dict[str, float] = field(default_factory=dict)
    text: str = ""


def _u(row: dict[str, Any]) -> float:
    return row["world_size"] / row["img_per_s"]


def _ok(row: dict[str, Any]) -> bool:
    return row["status"] == "ok" and bool(row["img_per_s"])


def _primary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default-settings curve with the most world sizes (ties: the larger batch), ok rows sorted by N."""
    curves: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["settings"] == "default" and _ok(r):
            curves.setdefault(group_key(r), []).append(r)
    if not curves:
        return []
    best = max(curves.values(), key=lambda c: (len({r["world_size"] for r in c}), group_key(c[0])[4] or 0))
    return sorted(best, key=lambda r: r["world_size"])


def _compute_only(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    same = ("model", "precision", "micro_batch", "grad_accum", "world_size")
    return next((r for r in rows if "compute_only" in r["settings"] and _ok(r)
                 and all(r[k] == row[k] for k in same)), None)


def _parts(rows: list[dict[str, Any]], base: dict[str, Any], top: dict[str, Any]) -> tuple[dict[str, float], str]:
    """Points lost per cause (see the module docstring) and the clause that explains the communication."""
    u0, un = _u(base), _u(top)
    d0, dn = base["data_share"] or 0.0, top["data_share"] or 0.0
    lost = 100 * (1 - top["efficiency"])
    parts = {"data wait": 100 * (un * dn - u0 * d0) / un}
    mb = grad_bytes(top["params"], top["comm_hook"]) / 1e6 if top["params"] else None
    step_ms = 1000 * top["step_s"]
    grads = (f"{mb:.3g} MB of {'bf16/fp16' if top['comm_hook'] in ('bf16', 'fp16') else 'fp32'} gradients per "
             f"{step_ms:,.0f} ms step" if mb is not None else f"a {step_ms:,.0f} ms step")
    probe = top["comm_share"]
    how = "DDP's communication hook" if top.get("comm_source") == "hook" else "the no_sync probe"
    probed = f"; {how} timed {probe * step_ms:,.0f} ms of it as exposed all-reduce" if probe else ""
    co = _compute_only(rows, top)
    if co is not None:
        uc, dc = _u(co), co["data_share"] or 0.0
        parts["shared machine"] = 100 * (uc * (1 - dc) - u0 * (1 - d0)) / un
        parts["communication"] = lost - parts["data wait"] - parts["shared machine"]
        return parts, f"communication ({grads}{probed})"
    if probe is None:
        parts["communication and slower compute"] = lost - parts["data wait"]
        return parts, f"communication and slower compute ({grads}; no sync measurement)"
    c0 = base["comm_share"] or 0.0
    parts["exposed communication"] = 100 * (un * probe - u0 * c0) / un
    parts["slower compute at N"] = lost - parts["data wait"] - parts["exposed communication"]
    return parts, f"exposed communication ({grads})"


def _clauses(parts: dict[str, float], comm_key: str, comm_clause: str, digits: int, co_eff: float | None) -> str:
    labels = {"shared machine": "the shared machine" + (f" (its compute_only run: efficiency {co_eff:.2f})"
                                                          if co_eff is not None else ""),
              "slower compute at N": "slower compute at N (shared machine or stragglers; the study has no "
                                     "compute_only run to tell them apart)",
              "data wait": "data wait"}
    shown = [(v, comm_clause if k == comm_key else labels[k]) for k, v in parts.items() if abs(v) >= 0.5]
    shown.sort(key=lambda p: -p[0])
    out = [f"{v:.{digits}f} to {what}" if v > 0 else f"{-v:.{digits}f} back on {what}" for v, what in shown]
    return ", ".join(out) if out else "none of it to any one cause"


def _settings(rows: list[dict[str, Any]], primary: list[dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """Per other settings variant: points gained at the largest N it shares with the default curve, and a phrase."""
    by_n = {r["world_size"]: r for r in primary if r["efficiency"] is not None}
    out: dict[str, tuple[float, str]] = {}
    variants = sorted({r["settings"] for r in rows if r["settings"] != "default"
                       and not any(s in r["settings"] for s in _SKIP)})
    for name in variants:
        mine = [r for r in rows if r["settings"] == name and _ok(r) and "efficiency" not in r.get("suspect", {})
                and r["efficiency"] is not None and r["world_size"] in by_n and r["world_size"] > min(by_n)]
        if not mine:
            continue
        r = max(mine, key=lambda x: x["world_size"])
        d = by_n[r["world_size"]]
        pts = 100 * (r["efficiency"] - d["efficiency"])
        verb = "recovered" if pts >= 0 else "cost"
        out[name] = (pts, f"{name} {verb} {abs(pts):.1f} points at N={r['world_size']} (efficiency "
                          f"{r['efficiency']:.2f} against {d['efficiency']:.2f}; {r['img_per_s']:,.1f} against "
                          f"{d['img_per_s']:,.1f} img/s)")
    return out


def _spread(row: dict[str, Any]) -> str:
    """", 0.74..0.87 over 3 repeats" for a repeated point; nothing for one measured once."""
    lo, hi = row.get("efficiency_lo"), row.get("efficiency_hi")
    if lo is None or hi is None:
        return ""
    what = "95% CI " if row.get("interval") == "bootstrap95" else ""
    return f", {what}{lo:.2f}..{hi:.2f} over {row['repeats']} repeats"


def _one(model: str, precision: str, rows: list[dict[str, Any]]) -> Verdict:
    name = model if precision == "no" else f"{model} ({precision})"
    curve = _primary(rows)
    failed = sorted({(r["world_size"], r["status"]) for r in rows if r["status"] != "ok"})
    fails = ", ".join(f"N={n} ended {s}" for n, s in failed)
    if len(curve) < 2 or curve[-1]["efficiency"] is None or curve[-1]["world_size"] == curve[0]["world_size"]:
        n = curve[0]["world_size"] if curve else None
        what = f"only N={n} measured" if n is not None else "no run succeeded"
        text = f"{name}: {what}" + (f" ({fails})" if fails else "") + "; no scaling to explain."
        return Verdict(model, precision, n, None, None, text=text)
    top = curve[-1]
    why = (top.get("suspect") or {}).get("efficiency")
    if why:
        text = f"{name}: its efficiency at N={top['world_size']} is suspect ({why}); no scaling to explain."
        return Verdict(model, precision, top["world_size"], None, None, text=text)
    base = curve[0]
    lost = 100 * (1 - top["efficiency"])
    digits = 0 if abs(lost) >= 10 else 1
    head = f"{name} keeps efficiency {top['efficiency']:.2f} at N={top['world_size']}"
    parts: dict[str, float] = {}
    if lost >= 0.5:
        parts, comm_clause = _parts(rows, base, top)
        comm_key = next(k for k in parts if "communication" in k)
        co = _compute_only(rows, top)
        head = (f"{name} loses {lost:.{digits}f} points at N={top['world_size']} against N={base['world_size']} "
                f"(efficiency {top['efficiency']:.2f}{_spread(top)}): "
                + _clauses(parts, comm_key, comm_clause, digits, co["efficiency"] if co else None))
    text = head + (f"; {fails}" if fails else "") + "."
    settings = _settings(rows, curve)
    if settings:
        text += " In this study " + "; ".join(p for _, p in settings.values()) + "."
    return Verdict(model, precision, top["world_size"], top["efficiency"], lost, parts,
                   {k: v for k, (v, _) in settings.items()}, text)


def verdicts(rows: list[dict[str, Any]]) -> list[Verdict]:
    """One :class:`Verdict` per model and precision of ``rows`` (the rows of :func:`~.aggregate.aggregate`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["precision"]), []).append(r)
    return [_one(m, p, rs) for (m, p), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "no"))]
