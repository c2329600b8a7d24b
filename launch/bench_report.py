"""Time ``cnnscale report`` over many run directories (issue 16: 1,000 runs in under 2 s, no torch).

Makes ``--runs`` run directories from the records of a fixture study (default: the quickstart study's 12 runs),
as ``--runs / 12`` copies of that study, each in a folder of its own with its all-reduce fit, the copies' model
names suffixed (``resnet18-c7``) so that every copy is a point of its own and the tables really have ``--runs``
rows (the worst case for rendering; ``--same-models`` keeps the names, making the copies repeats of 12 points).
Then runs ``python -m cnnscale report DIR`` in a fresh interpreter ``--rounds`` times (what a user waits for:
imports, reading, aggregating, rendering) and prints the median, min and max wall time as JSON.

    python launch/bench_report.py                        # 1,000 runs, 7 rounds, text report to /dev/null
    python launch/bench_report.py --runs 200 --rounds 3 --keep /tmp/bench_runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnscale.records.run import find_runs
from cnnscale.records.schema import (
    Env,
    Point,
    Summary,
    read_env,
    read_point,
    read_summary,
    write_env,
    write_point,
    write_summary,
)

__all__ = ["make_runs", "time_report", "main"]

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "quickstart_study"


def _rename(run: Path, suffix: str) -> None:
    """Give the run's model (in summary, env and point) the name ``model + suffix``."""
    s, e, p = read_summary(run), read_env(run), read_point(run)
    write_summary(run, Summary.from_dict({**s.to_dict(), "model": f"{s.model}{suffix}"}))
    write_env(run, Env.from_dict({**e.to_dict(), "model": f"{e.model}{suffix}"}))
    write_point(run, Point.from_dict({**p.to_dict(), "model": f"{p.model}{suffix}"}))


def make_runs(out: Path, runs: int, fixture: Path = FIXTURE, same_models: bool = False) -> int:
    """Write ``runs`` run directories under ``out`` (copies of ``fixture``'s); returns how many were made."""
    sources = find_runs([fixture])
    made = 0
    copy = 0
    while made < runs:
        study = out / f"study-{copy:04d}"
        study.mkdir(parents=True)
        for extra in fixture.glob("*.json"):
            shutil.copy(extra, study / extra.name)
        for src in sources[: runs - made]:
            dst = study / src.name
            shutil.copytree(src, dst)
            if not same_models:
                _rename(dst, f"-c{copy}")
            made += 1
        copy += 1
    return made


def time_report(root: Path, rounds: int, args: list[str]) -> list[float]:
    """Wall seconds of ``rounds`` fresh ``python -m cnnscale report root ARGS`` runs (output discarded)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnscale", "report", str(root), *args], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    """Make the run directories, time the report, print a JSON line; exit 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000, help="run directories to make (default 1000)")
    ap.add_argument("--rounds", type=int, default=7, help="timed report runs (default 7)")
    ap.add_argument("--width", type=int, default=120, help="console width of the report (default 120)")
    ap.add_argument("--same-models", action="store_true", help="keep model names: the copies become repeats")
    ap.add_argument("--keep", help="make the runs here and keep them (default: a temporary directory)")
    ap.add_argument("--report-args", default="", help="extra report arguments, e.g. '--predict'")
    args = ap.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cnnscale-bench-report-"))
    try:
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"bench_report: {root} is not empty")
        t0 = time.perf_counter()
        made = make_runs(root, args.runs, same_models=args.same_models)
        setup = time.perf_counter() - t0
        times = time_report(root, args.rounds, ["--width", str(args.width), *args.report_args.split()])
        print(json.dumps({"runs": made, "rounds": args.rounds, "median_s": round(statistics.median(times), 3),
                          "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                          "times_s": [round(t, 3) for t in times], "setup_s": round(setup, 1),
                          "distinct_points": not args.same_models}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
