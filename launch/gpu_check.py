#!/usr/bin/env python3
"""The Python half of launch/gpu_check.sh: the NVML check, finding and decoding the data, and the summary.

    python launch/gpu_check.py nvml --out RES/nvml_check.json [--dry-run]
    python launch/gpu_check.py find-data DIR          # prints the ImageFolder root (the folder with train/, test/)
    python launch/gpu_check.py decode ROOT            # decodes train/ and test/ once into the device loader's cache
    python launch/gpu_check.py summary RES [--write OUT] [--dry-run] [--goal-model resnet18] [--quiet]

``summary`` reads what the shell script wrote into RES (bench JSONs, nvml_check.json, run directories) and OUT's
steps.tsv, prints the steps, the bench table and the ResNet-18 goal beside the measured figures, writes
OUT/gpu_check.json and OUT/summary.txt (the shell script calls it after every step, so a run cut short still says what
it measured), and exits 1 when a check failed (a missed performance goal is reported, not a failure; a step skipped
at the deadline is reported as skipped).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnscale.errors import UserError, run_cli  # noqa: E402

# The issue's goal for ResNet-18 on one H100 in bf16 with the fast path on.
GOAL = {"model": "resnet18", "device": "H100", "mfu": 0.35, "img_per_s": 100_000, "gflops_per_img": 3.34}


def nvml_check(out: Path, dry_run: bool, seconds: float = 3.0) -> dict[str, Any]:
    """Run a matmul loop under the NVML sampler: on a GPU it must read real utilisation and memory.

    Without a GPU (the dry run) the sampler must say "n/a" and report None, never crash or read zero.
    """
    # lazy: torch costs ~8 s to import; find-data and summary, which the shell script also calls, do without it
    import torch

    from cnnscale.profile.nvml import NvmlSampler

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sampler = NvmlSampler.for_device(device, hz=20.0)
    n = 8192 if cuda else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    sampler.start()
    t0, iters = time.perf_counter(), 0
    while time.perf_counter() - t0 < (seconds if cuda else 0.3):
        for _ in range(20 if cuda else 1):
            a = (a @ a).clamp_(-1, 1)
        if cuda:
            torch.cuda.synchronize()
        iters += 1
    sampler.stop()
    s = sampler.summary()
    allocated = torch.cuda.max_memory_allocated(device) if cuda else None
    if cuda:
        checks = {"available": sampler.available, "util_mean_over_50pct": (s["gpu_util_pct_mean"] or 0) > 50,
                  "mem_used_at_least_allocated": (s["gpu_mem_used_bytes_peak"] or 0) >= (allocated or 0) > 0}
    else:
        checks = {"unavailable_says_na": sampler.status.startswith("n/a"),
                  "values_are_none_not_zero": all(v is None for v in s.values())}
    doc = {"device": str(device), "status": sampler.status, "iterations": iters, "allocated_peak_bytes": allocated,
           **s, "checks": checks, "ok": all(checks.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"nvml: status={sampler.status} util_mean={s['gpu_util_pct_mean']} mem_peak={s['gpu_mem_used_bytes_peak']} "
          f"allocated={allocated} -> {'ok' if doc['ok'] else 'FAILED'} {checks}")
    return doc


def find_data(root: Path) -> Path:
    """The ImageFolder root under ``root``: the shallowest folder holding both ``train/`` and ``test/``."""
    for cand in sorted([root, *(p for p in root.rglob("*") if p.is_dir())], key=lambda p: len(p.parts)):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise UserError(f"no ImageFolder data (a folder with train/ and test/) under {root}")


def decode(root: Path) -> None:
    """Decode the ImageFolder's train and test JPEGs once into the device loader's uint8 cache beside the data, so
    that every run of the check reuses them instead of decoding 60,000 files again."""
    # lazy: torch costs ~8 s to import; find-data and summary do without it
    from cnnscale.config import DataConfig
    from cnnscale.data.datasets import load_arrays

    t0 = time.perf_counter()
    sizes = {split: len(load_arrays(DataConfig(name="imagefolder", data_dir=str(root)), 0, split).y)
             for split in ("train", "test")}
    print(f"decoded {sizes} from {root} in {time.perf_counter() - t0:.1f} s")


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _steady(run: Path) -> float | None:
    """Median img/s of the log windows after the first (which holds compilation and warm-up)."""
    rates = [json.loads(line).get("window_img_per_s") for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip()] if (run / "metrics.jsonl").is_file() else []
    rates = [r for r in rates if r]
    return statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None


def run_figures(run: Path) -> dict[str, Any]:
    """img/s overall and steady, and MFU from the run's own FLOP count and peak (env.json)."""
    summary, env = _read(run / "summary.json") or {}, _read(run / "env.json") or {}
    steady = _steady(run)
    flops, peak, world = env.get("train_flops_per_img"), env.get("peak_tflops"), env.get("world_size") or 1
    mfu = steady * flops / (peak * 1e12 * world) if steady and flops and peak else None
    return {"run": str(run), "status": summary.get("status"), "steps": summary.get("steps"),
            "device": env.get("device_name"), "img_per_s_overall": summary.get("img_per_s"),
            "img_per_s_steady": steady, "gflops_per_img": flops / 1e9 if flops else None, "peak_tflops": peak,
            "peak_source": env.get("peak_source"), "mfu_steady": mfu, "mfu_overall": summary.get("mfu"),
            "fast_path": env.get("fast_path_applied"), "loader": env.get("loader"),
            "mixed_precision": env.get("mixed_precision"), "data_wait_s": summary.get("data_wait_s"),
            "train_time_s": summary.get("train_time_s"), "gpu_util_pct_mean": summary.get("gpu_util_pct_mean")}


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _bench_table(bench: dict[str, Any]) -> Table:
    t = Table(title="cnnscale bench, bf16 (img/s per device | MFU)")
    t.add_column("model")
    for name in bench:
        t.add_column(name, justify="right")
    models = sorted({r["model"] for doc in bench.values() if doc for r in doc["models"]})
    for m in models:
        cells = []
        for doc in bench.values():
            row = next((r for r in (doc or {}).get("models", []) if r["model"] == m), None)
            cells.append("n/a" if row is None
                         else f"{_fmt(row.get('img_per_s'), ',.0f')} | {_fmt(row.get('mfu'), '.1%')}")
        t.add_row(m, *cells)
    return t


def _run_line(name: str, f: dict[str, Any]) -> str:
    return (f"{name}: status={f['status']} steps={f['steps']} img/s steady={_fmt(f['img_per_s_steady'], ',.0f')} "
            f"overall={_fmt(f['img_per_s_overall'], ',.0f')} MFU steady={_fmt(f['mfu_steady'], '.1%')} "
            f"({_fmt(f['gflops_per_img'], '.3g')} GFLOPs/img, peak {_fmt(f['peak_tflops'], ',.1f')} TFLOP/s "
            f"{f['peak_source']}) data wait={_fmt(f['data_wait_s'], '.2f')} s")


def _goal_lines(goal_model: str, fast: dict[str, Any], dry_run: bool) -> tuple[list[str], bool]:
    met = (fast.get("mfu_steady") or 0) >= GOAL["mfu"]
    goal = (f"goal ({GOAL['model']}, {GOAL['device']}, bf16, fast path): >= {GOAL['mfu']:.0%} MFU, "
            f"~{GOAL['img_per_s']:,} img/s at {GOAL['gflops_per_img']} GFLOPs per training image")
    got = (f"measured ({goal_model}, {fast.get('device') or 'n/a'}): {_fmt(fast.get('img_per_s_steady'), ',.0f')} "
           f"img/s, {_fmt(fast.get('mfu_steady'), '.1%')} MFU at {_fmt(fast.get('gflops_per_img'), '.3g')} GFLOPs "
           f"per training image -> {'goal met' if met else 'goal not met'}"
           + (" (dry run on CPU: not comparable)" if dry_run else ""))
    return [goal, got], met


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The rows of steps.tsv: name, exit (an int, or "skipped" at the deadline) and seconds."""
    rows = [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()] if path.is_file() else []
    return [{"step": r[0], "exit": int(r[1]) if r[1].lstrip("-").isdigit() else r[1], "seconds": int(r[2])}
            for r in rows if len(r) == 3]


def _steps_table(steps: list[dict[str, Any]]) -> Table:
    t = Table(title="steps (exit 124: hit its time cap; skipped: did not fit before the deadline)")
    for col in ("step", "exit", "seconds"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for r in steps:
        t.add_row(r["step"], str(r["exit"]), str(r["seconds"]))
    return t


def summarise(res: Path, dry_run: bool, goal_model: str, write: Path | None = None, quiet: bool = False) -> int:
    """Print the steps, the bench table, the runs and the goal beside the measured figures; write gpu_check.json
    and summary.txt into ``write`` (default ``res``). Returns 1 when a check failed (a missed goal is not one)."""
    out = write or res
    console = Console(width=150, record=True, file=io.StringIO() if quiet else None)  # quiet: files only
    steps = read_steps(out / "steps.tsv")
    console.print(_steps_table(steps))
    bench = {p.stem: _read(p) for p in sorted((res / "bench").glob("*.json"))}
    console.print(_bench_table(bench))
    runs = {p.name: run_figures(p) for p in sorted((res / "runs").glob("*")) if (p / "env.json").is_file()}
    for name, f in runs.items():
        console.print(_run_line(name, f))
    lines, met = _goal_lines(goal_model, runs.get(f"{goal_model}-fast", {}), dry_run)
    for line in lines:
        console.print(line)
    nvml = _read(res / "nvml_check.json") or {}
    failures = [r["step"] + (" (skipped at the deadline)" if r["exit"] == "skipped" else "") for r in steps
                if r["exit"] != 0]
    failures += [n for n, doc in bench.items() if not doc] + ([] if nvml.get("ok") else ["nvml"])
    failures += [n for n, f in runs.items() if f["status"] != "ok"]
    if f"{goal_model}-fast" not in runs:
        failures.append(f"{goal_model}-fast run missing")
    failures = list(dict.fromkeys(failures))
    doc = {"dry_run": dry_run, "goal": GOAL, "goal_met": met, "steps": steps, "runs": runs, "nvml": nvml,
           "bench": {n: (d or {}).get("models") for n, d in bench.items()}, "failures": failures}
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    console.print("checks: " + ("all passed" if not failures else f"FAILED: {', '.join(failures)}"))
    (out / "summary.txt").write_text(console.export_text())
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("nvml")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("find-data")
    p.add_argument("dir")
    p = sub.add_parser("decode")
    p.add_argument("dir")
    p = sub.add_parser("summary")
    p.add_argument("out", help="the results folder (bench/, runs/, nvml_check.json)")
    p.add_argument("--write", default=None, help="where gpu_check.json and summary.txt go (and steps.tsv is read)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--goal-model", default="resnet18")
    p.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = ap.parse_args(argv)
    if args.cmd == "nvml":
        return 0 if nvml_check(Path(args.out), args.dry_run)["ok"] else 1
    if args.cmd == "find-data":
        print(find_data(Path(args.dir)))
        return 0
    if args.cmd == "decode":
        decode(Path(args.dir))
        return 0
    return summarise(Path(args.out), args.dry_run, args.goal_model, Path(args.write) if args.write else None,
                     args.quiet)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="gpu_check.py"))
