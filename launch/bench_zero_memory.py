#!/usr/bin/env python3
"""Per-rank peak memory by ZeRO stage, measured beside the ZeRO memory model (cnnscale/scaling/memory.py).

    python launch/bench_zero_memory.py --model vgg16_classic --optimizer adam --micro-batch 8 --steps 3

Runs DDP and DeepSpeed ZeRO-1, 2 and 3, one after another (never side by side: each is memory-heavy), each with the
same batch and ``--num-processes`` real processes on this machine, as ordinary run directories under ``--out``. The
measured figure is each rank's peak RSS during the training loop (``summary.json``'s ``rank_peak_rss_bytes``, on CPU;
on GPU the allocator peak ``max_memory_allocated_bytes`` is the comparable one). To compare with the model, which
counts model states only, the same configuration is run with a tiny model (``--baseline-model``) and its peak is
subtracted: what remains is what the big model itself costs. Writes ``zero_memory.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnnscale.config import OPTIMIZERS  # noqa: E402
from cnnscale.errors import UserError, run_cli  # noqa: E402
from cnnscale.records.schema import read_env, read_summary  # noqa: E402

CONFIGS = {"ddp": ("launch/accelerate/ddp.yaml", 0), **{f"zero{s}": (f"launch/accelerate/deepspeed_zero{s}.yaml", s)
                                                         for s in (1, 2, 3)}}
GB = 1e9


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_zero_memory.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vgg16_classic")
    ap.add_argument("--baseline-model", default="lenet5", help="tiny model whose peak is subtracted ('' : none)")
    ap.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    ap.add_argument("--precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--configs", default="ddp,zero1,zero2,zero3", help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--port", type=int, default=29860, help="first rendezvous port; each run takes the next one")
    ap.add_argument("--out", default="runs/zero_memory")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = ap.parse_args(argv)
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad:
        raise UserError(f"unknown config {bad[0]!r} (choose from: {', '.join(CONFIGS)})")
    return args


def _launch(args: argparse.Namespace, name: str, model: str, port: int, out: Path) -> dict:
    """One run with real processes; returns its summary (raises UserError when it did not finish)."""
    config_file, _ = CONFIGS[name]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
           "--num_processes", str(args.num_processes), "--main_process_port", str(port), "launch/train.py",
           "--model", model, "--data", "synthetic", "--data.synthetic_size", str(args.micro_batch * args.num_processes),
           "--data.val_size", "0", "--data.num_workers", "0", "--train.eval_every_epoch", "false",
           "--max-steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--optim.name", args.optimizer,
           "--lr", "0.0001", "--sched.name", "none", "--mixed-precision", args.precision, "--train.log_every",
           str(args.steps), "--train.progress", "none", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cache = os.environ.get("CNNSCALE_CACHE_DIR")  # as launch/test.sh; DeepSpeed's comm op is built once per machine
    ext = Path(cache) / "torch_extensions" if cache else ROOT / ".torch_extensions"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ext))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout, capture_output=True, text=True, check=False)
    summary = read_summary(out).to_dict() if (out / "summary.json").is_file() else {}
    if proc.returncode != 0 or summary.get("status") != "ok":
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        why = next((ln for ln in lines if "error:" in ln or "Error:" in ln), lines[-1] if lines else "no output")
        raise UserError(f"{name} run of {model} failed (exit {proc.returncode}): {why.strip()}")
    env_json = read_env(out).to_dict()
    if env_json.get("world_size") != args.num_processes:
        raise UserError(f"{name} ran at world size {env_json.get('world_size')}, not {args.num_processes}")
    return {"summary": summary, "env": env_json}


def _row(args: argparse.Namespace, name: str, big: dict, base: dict | None) -> dict:
    env, ranks = big["env"], big["summary"]["rank_peak_rss_bytes"]
    stage = CONFIGS[name][1]
    if (env.get("zero_stage") or 0) != stage:
        raise UserError(f"{name}: env.json says zero_stage={env.get('zero_stage')}, expected {stage}")
    base_ranks = base["summary"]["rank_peak_rss_bytes"] if base else [0] * len(ranks)
    pred = env["predicted_rank_bytes"]
    return {"config": name, "zero_stage": stage, "world_size": env["world_size"], "param_count": env["param_count"],
            "largest_layer_params": env["largest_layer_params"], "rank_peak_rss_bytes": ranks,
            "baseline_rank_peak_rss_bytes": base_ranks,
            "measured_model_bytes": [r - b for r, b in zip(ranks, base_ranks)], "predicted": pred}


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    t = Table(title=f"{args.model}, {args.optimizer}, precision {args.precision}, micro batch {args.micro_batch}, "
                    f"{args.num_processes} ranks: per-rank memory (GB)")
    for col in ("config", "peak RSS per rank", f"minus {args.baseline_model or 'nothing'}", "predicted total",
                "model states", "working set", "measured/predicted"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        meas = max(r["measured_model_bytes"])
        pred = r["predicted"]
        t.add_row(r["config"], " / ".join(f"{b / GB:.2f}" for b in r["rank_peak_rss_bytes"]),
                  " / ".join(f"{b / GB:.2f}" for b in r["measured_model_bytes"]), f"{pred['total'] / GB:.2f}",
                  f"{pred['model_states'] / GB:.2f}", f"{pred['working_set'] / GB:.2f}",
                  f"{meas / pred['total']:.2f}" if pred["total"] else "n/a")
    Console(width=140).print(t)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    out = Path(args.out)
    rows, port = [], args.port
    for name in args.configs.split(","):
        big = _launch(args, name, args.model, port, out / f"{args.model}-{name}")
        base = None
        if args.baseline_model:
            base = _launch(args, name, args.baseline_model, port + 1, out / f"{args.baseline_model}-{name}")
        rows.append(_row(args, name, big, base))
        port += 2
        print(f"{name}: peak RSS per rank {[round(b / GB, 2) for b in rows[-1]['rank_peak_rss_bytes']]} GB", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_memory.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    _print(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_zero_memory.py"))
