"""The run directory as training writes it: config.yaml, env.json, metrics.jsonl and summary.json, on rank 0 only;
and the experiment trackers (:mod:`cnnscale.train.trackers`), which get every metrics.jsonl record as it is written.

Every rank calls the same methods (some are collective: :func:`resolve_out`, :meth:`RunFiles.start`); only the main
process touches the files. The record layout itself is :mod:`cnnscale.records`.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list, gather_object

from cnnscale.config import Config, config_to_dict
from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.records.env import collect_env
from cnnscale.records.schema import Env, Summary, write_env, write_summary
from cnnscale.train import trackers

__all__ = ["resolve_out", "check_writable", "RunFiles"]


def resolve_out(cfg: Config, num_processes: int) -> Path:
    """The run directory: ``--resume DIR``, ``--out DIR`` or ``runs/MODEL-wsN-STAMP``, rank 0's choice broadcast to
    every rank (collective)."""
    out = cfg.train.resume if cfg.train.resume else cfg.train.out
    if not out:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f"runs/{cfg.model.name}-ws{num_processes}-{stamp}"
    holder = [out]
    broadcast_object_list(holder)
    return Path(holder[0])


def check_writable(path: Path) -> None:
    """Fail before anything is written. Root passes every permission bit, but ``os.access`` still reports a read-only
    mount or an immutable directory to root; a regular file in the way is checked by name."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"output directory {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {existing}")


class RunFiles:
    """The record files of one run; a no-op on every rank but the main one."""

    def __init__(self, run_dir: Path, accelerator: Any) -> None:
        self.run_dir, self.acc = run_dir, accelerator
        self.is_main = bool(accelerator.is_main_process)
        self.metrics: records.MetricsLog | None = None

    def start(self, cfg: Config, env_extra: dict[str, Any], resumed_at: int | None) -> None:
        """Write config.yaml, env.json (``env_extra`` on top of the collected environment) and a ``running``
        summary; open metrics.jsonl, cut back to ``resumed_at`` on a resume; start the trackers (``train.trackers``)
        with the resolved config as hyperparameters. Collective (gathers hostnames)."""
        hosts = gather_object([socket.gethostname()])
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records.write_yaml(self.run_dir / records.CONFIG, config_to_dict(cfg))
        write_env(self.run_dir, Env.from_dict(collect_env(self.acc, hosts, env_extra)))
        running = Summary(status="running", model=cfg.model.name, world_size=self.acc.num_processes)
        write_summary(self.run_dir, running)  # a resumed run is running again
        if resumed_at is not None:  # steps past the checkpoint are logged again from here
            records.truncate_metrics(self.run_dir / records.METRICS, resumed_at)
        self.metrics = records.MetricsLog(self.run_dir / records.METRICS)
        trackers.start(self.acc, self.run_dir, cfg)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line, and the same record (step and keys) to the trackers."""
        if self.metrics is not None:
            self.metrics.log(record)
            trackers.log(self.acc, record)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the final summary.json (fields checked against the records schema) and close metrics.jsonl."""
        if not self.is_main:
            return
        write_summary(self.run_dir, Summary.from_dict(summary))
        if self.metrics is not None:
            self.metrics.close()
