"""What ``cnnscale bench`` shows and writes: the per-model table, the ratios table, and the ``--json`` document."""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from cnnscale import __version__
from cnnscale.records.env import git_sha

__all__ = ["print_table", "print_ratios", "results_doc", "device_name"]


def _fmt(x: Any, spec: str = ",.0f", scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, spec)


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # piped to a file: don't squeeze the table


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    """One row per model: img/s, step time, step split, peak memory, utilisation, FLOPs, MFU ("n/a" when absent)."""
    gpu = device.type == "cuda"
    t = Table(title=f"cnnscale bench on {device_name(device)} (synthetic data, device loader, profiler on)")
    for col in ("model", "img/s", "step ms p50", "p90", "fwd+bwd %", "optim %", "data %",
                "peak mem GiB" + (" (alloc)" if gpu else " (RSS)"), "GPU util %" if gpu else "CPU %",
                "GFLOPs/img", "TFLOP/s", "MFU %"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        wall = r["train_time_s"]
        mem = r["max_memory_allocated_bytes"] if gpu else r["peak_rss_bytes"]
        t.add_row(r["model"], _fmt(r["img_per_s"]), _fmt(r["step_ms_p50"], ",.1f"), _fmt(r["step_ms_p90"], ",.1f"),
                  _fmt(r["fwd_bwd_s"] / wall, ".0f", 100), _fmt(r["optim_s"] / wall, ".0f", 100),
                  _fmt(r["data_wait_s"] / wall, ".0f", 100), _fmt(mem, ".2f", 2**-30),
                  _fmt(r["gpu_util_pct_mean"] if gpu else r["cpu_percent"], ".0f"), _fmt(r["gflops_per_img"], ".3f"),
                  _fmt(r["achieved_tflops"], ".4f"), _fmt(r["mfu"], ".1f", 100))
    _console().print(t)
    if rows:
        print(f"peak for MFU: {_fmt(rows[0]['peak_tflops'], '.4g')} TFLOP/s ({rows[0]['peak_source'] or 'n/a'}"
              f"{_cache_note(rows[0])})")


def _cache_note(row: dict[str, Any]) -> str:
    """``; cache hit, measured 3.2 min ago`` for a CPU peak from the host cache; empty for a table or config peak."""
    status, age = row.get("peak_cache"), row.get("peak_age_s")
    if status is None:
        return ""
    return f"; cache {status}" + (f", measured {age / 60:.1f} min ago" if status == "hit" and age is not None else "")


def print_ratios(ratios: dict[str, Any]) -> None:
    """One row per ratio with its goal and PASS/MISS (``-`` where it has no goal); nothing when none was measured."""
    if not ratios:
        return
    t = Table(title="ratios: median of per-round ratios (sides alternated, so the machine's load falls on both), "
              "interval: min-max below 5 rounds, bootstrap 95% from 5")
    for col in ("ratio", "ours img/s", "theirs img/s", "median", "interval", "± %", "rounds", "goal", "result"):
        t.add_column(col, justify="left" if col == "ratio" else "right")
    items = [(f"overhead {m}", r) for m, r in ratios.get("overhead", {}).items()]
    items += [(k, ratios[k]) for k in ("data", "e2e") if k in ratios]
    for label, r in items:
        goal = r["goal"]
        verdict = "-" if goal is None else _verdict(r, goal)
        kind = {"bootstrap95": "95%", "min-max": "min-max", "single": "none"}.get(r.get("interval"), "?")
        t.add_row(label, _fmt(r["ours_img_per_s"]), _fmt(r["theirs_img_per_s"]), f"{r['ratio']:.3f}",
                  f"[{r['lo']:.3f}, {r['hi']:.3f}] {kind}", _fmt(r.get("half_width"), ".1f", 100),
                  f"{r['rounds']} ({r.get('stopped_by', 'rounds')})", "-" if goal is None else f">= {goal:g}", verdict)
    _console().print(t)
    if any(r["goal"] is not None and not (r["lo"] >= r["goal"] or r["hi"] < r["goal"]) for _, r in items):
        print("?: the interval straddles the goal (the median decides; more rounds or a quieter machine settle it)")


def _verdict(r: dict[str, Any], goal: float) -> str:
    """PASS / MISS when the whole interval is on one side of the goal; PASS? / MISS? (the median's side) when not."""
    if r["lo"] >= goal or r["hi"] < goal:
        return "PASS" if r["lo"] >= goal else "MISS"
    return "PASS?" if r["ratio"] >= goal else "MISS?"


def results_doc(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
                ratios: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: versions, device, options, the model rows and the ratios."""
    opts = {k: v for k, v in vars(args).items() if k != "model_list"}
    return {"version": __version__, "git_sha": git_sha(), "device": device_name(device),
            "torch": torch.__version__, "options": opts, "models": rows, "ratios": ratios,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
