"""The local study runner: every point of a study's matrix as a real multi-process launch on this machine.

Each point writes one run directory ``OUT/<point id>/`` (``OUT/<point id>-r<k>/`` for its repeat k >= 1): the
trainer's records, ``launch.log``, and the study's ``point.json`` (:mod:`cnnscale.study.outcome`). Points already
done (point.json and summary.json both ok at the right world size) are skipped, so a study resumes where it stopped;
a point stopped half-way (a checkpoint, but no ok record) carries on from its checkpoint (``--resume``). A point that
fails is recorded with status failed | oom | timeout | diverged and its error line, and the study goes on. Points
run in the study's working directory, with absolute run directories, so a study works from any directory. Model
names are checked by the trainer, inside the point, so a bad name is a failed point with the trainer's one-line
error.

Before the matrix: an optional max_batch search (the largest micro-batch per model that fits, by halving on
out-of-memory), and an all-reduce benchmark (:mod:`cnnscale.study.allreduce_bench`) that fits the "measured"
interconnect into ``OUT/allreduce.json``. Nothing here imports torch: the launches are subprocesses.

A study with network profiles (``network:`` / ``networks:``) runs in the network lab (:mod:`cnnscale.lab`): before
the matrix, the largest world size's namespaces are made (and removed after it, on every way out: the end, an
exception, Ctrl-C/SIGTERM/SIGHUP, a failed or killed point); for each profile the link is shaped and measured, and
the all-reduce benchmark runs at every world size N >= 2 of the matrix, one rank per namespace, into
``OUT/allreduce-<profile>-ws<N>.json`` (the benchmark's keys plus ``profile``, ``rate_bps``, ``namespaces`` and
the measured ``link``), in place of ``allreduce.json``. Each point of world size >= 2 then runs one process per
namespace under its profile (a compute_only calibration under none: unshaped); world size 1 runs on the host.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from cnnscale.errors import UserError
from cnnscale.lab.session import LabSession, check_available
from cnnscale.lab.shape import UNSHAPED, parse_profile
from cnnscale.records import io as records
from cnnscale.study.launcher import (
    BACKENDS,
    TRAIN_MODULE,
    Backend,
    Outcome,
    build_command,
    check_gpu_world_sizes,
    direct_envs,
    free_port,
    point_env,
    port_in_use,
    run_group,
    target_argv,
)
from cnnscale.study.matrix import Point, check_targets, expand, point_args
from cnnscale.study.outcome import PointRecord, read_done, record_point, resumable, run_summary
from cnnscale.study.progress import StudyProgress, make_study_progress
from cnnscale.study.spec import StudySpec
from cnnscale.study.stop import StudyStopped

__all__ = ["run_point", "run_study", "preflight", "find_max_batch", "ALLREDUCE_MODULE"]

ALLREDUCE_MODULE = "cnnscale.study.allreduce_bench"
LAB_BENCH_TIMEOUT_S = 300.0


def _launch(target: str, args: list[str], n: int, spec: StudySpec, log: Path, backend: Backend,
            lab: LabSession | None, network: str, timeout_s: float) -> Outcome:
    """One launch of ``target`` at world size ``n``: in the lab (one process per namespace, ``network`` shaped,
    "" unshaped) when there is one and n > 1; the ``direct`` launcher's n ranks on this machine (local backend);
    else the backend's ordinary launch (one command: a launcher, or the target at n = 1)."""
    env = point_env(spec.threads_per_process)
    if lab is None or n == 1:
        cmd = build_command(target, args, n, free_port(), spec.launcher)
        if spec.launcher == "direct" and n > 1 and backend.name == "local":
            return run_group([cmd] * n, direct_envs(env, n, free_port()), log, timeout_s)
        return backend.run(cmd, env, log, timeout_s)
    argv = [sys.executable, *target_argv(target), *args]
    # the rendezvous port is inside the lab's own namespaces; a fresh one per launch avoids the last one's TIME_WAIT
    envs = lab.envs(env, n, free_port(), network or UNSHAPED)
    return run_group(lab.commands(argv, n), envs, log, timeout_s)


def run_point(p: Point, spec: StudySpec, run_dir: Path, backend: Backend,
              lab: LabSession | None = None) -> PointRecord:
    """Launch one point (one retry if its port was taken meanwhile) and record how it ended (point.json). A point
    stopped half-way resumes from its checkpoint; any other earlier attempt is cleared first. When the study itself
    is stopped (:class:`StudyStopped`, Ctrl-C) the point is recorded as failed with the signal, and that goes on up.
    ``lab``: the study's network lab, where points of world size >= 2 run."""
    resume = p.script == TRAIN_MODULE and resumable(run_dir)
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a stale failed attempt: start clean
    run_dir.mkdir(parents=True, exist_ok=True)
    log, attempts, t0 = run_dir / "launch.log", 0, time.monotonic()
    try:
        for _attempt in range(2):
            attempts += 1
            args = point_args(p, spec, run_dir, resume=resume)
            out = _launch(p.script, args, p.world_size, spec, log, backend, lab, p.network, spec.timeout_s)
            if out.status != "failed" or not port_in_use(log.read_text(errors="replace")):
                break
    except (StudyStopped, KeyboardInterrupt) as exc:
        why = f"stopped: the study got {exc.name if isinstance(exc, StudyStopped) else 'SIGINT'}"
        record_point(run_dir, p, spec.name, "failed", why, time.monotonic() - t0, attempts=attempts,
                     backend=backend.name)
        raise
    return record_point(run_dir, p, spec.name, out.status, out.error, out.seconds, attempts=attempts,
                        backend=backend.name)


def find_max_batch(probe: Callable[[int], str], start: int) -> int:
    """Largest micro-batch ``start / 2^k`` for which ``probe(batch)`` does not report "oom" (halving on each
    out-of-memory, as Accelerate's ``find_executable_batch_size`` does). ``probe`` returns a status string; each
    probe is a real launch, so this costs up to log2(start) launches."""
    batch = start
    while batch >= 1:
        status = probe(batch)
        if status == "ok":
            return batch
        if status != "oom":
            raise UserError(f"max_batch search: probe at micro_batch {batch} ended '{status}', not oom")
        batch //= 2
    raise UserError(f"max_batch search: every micro-batch from {start} down to 1 ran out of memory")


def _max_batches(spec: StudySpec, out: Path, backend: Backend, say: Callable[[str], None]) -> dict[str, int]:
    if not spec.max_batch:
        return {}
    path = out / "max_batch.json"
    found: dict[str, int] = records.read_json(path) if path.is_file() else {}
    for m in spec.models:
        if m.name in found:
            continue

        def probe(bs: int, name: str = m.name) -> str:
            p = Point(name, 1, spec.precisions[0], bs, 1, spec.max_batch["steps"], "probe", tuple(spec.overrides))
            return run_point(p, spec, out / "_max_batch" / p.id, backend).status

        found[m.name] = find_max_batch(probe, spec.max_batch["start"])
        say(f"max_batch {m.name}: {found[m.name]}")
        records.write_json(path, found)
    return found


def _allreduce_bench(spec: StudySpec, out: Path, backend: Backend, say: Callable[[str], None]) -> None:
    path = out / "allreduce.json"
    if not spec.allreduce_bench or path.is_file() or max(spec.world_sizes) < 2:
        return
    args = ["--out", str(path), "--max-mb", "32", "--repeats", "3"]
    res = _launch(ALLREDUCE_MODULE, args, 2, spec, out / "allreduce.log", backend, None, "", 180)
    say(f"all-reduce benchmark: {res.status} ({res.seconds:.0f} s){' ' + res.error if res.error else ''}")


def _lab_bench(spec: StudySpec, out: Path, backend: Backend, lab: LabSession, say: Callable[[str], None]) -> None:
    """Per profile: measure the shaped link, then time the all-reduce at every N >= 2 of the matrix in the lab
    (``OUT/allreduce-<profile>-ws<N>.json``; one already there is kept). Sizes up to 16 MiB under 1gbit, 32 MiB at
    and above it (the slowest profile's bench stays ~10 s)."""
    for name in spec.profiles:
        prof = parse_profile(name)
        got = lab.measure(prof)
        rate = f" of {prof.rate_bps / 1e6:g} Mbit/s" if prof.rate_bps else ""
        say(f"network {name}: link {got['bandwidth_Bps'] * 8 / 1e6:.0f} Mbit/s{rate}, round trip "
            f"{got['rtt_s'] * 1e6:.0f} us")
        if not spec.allreduce_bench:
            continue
        max_mb = "16" if prof.rate_bps and prof.rate_bps < 1e9 else "32"
        for n in sorted({n for n in spec.world_sizes if n > 1}):
            path = out / f"allreduce-{name}-ws{n}.json"
            if path.is_file():
                continue
            args = ["--out", str(path), "--max-mb", max_mb, "--repeats", "3"]
            res = _launch(ALLREDUCE_MODULE, args, n, spec, out / f"allreduce-{name}-ws{n}.log", backend, lab, name,
                          LAB_BENCH_TIMEOUT_S)
            if res.status == "ok" and path.is_file():
                data = records.read_json(path)
                data.update(profile=name, rate_bps=prof.rate_bps, namespaces=n, link=got)
                records.write_json(path, data)
            say(f"all-reduce benchmark {name} ws{n}: {res.status} ({res.seconds:.0f} s)"
                f"{' ' + res.error if res.error else ''}")


def _lab(spec: StudySpec, say: Callable[[str], None]) -> AbstractContextManager[LabSession | None]:
    """The study's network lab (namespaces for its largest world size), or a no-op for a study without one."""
    return LabSession(max(*spec.world_sizes, 2), say) if spec.profiles else nullcontext(None)


def preflight(spec: StudySpec, backend: str = "local") -> None:
    """The checks that need no launch, made before anything is written: world sizes this machine can run (local
    backend), the batch rules, missing scripts, and for a study with networks whether the lab can run here (root,
    ip, tc, namespaces; the local backend only). Raises a one-line UserError."""
    if spec.profiles:
        if backend != "local":
            raise UserError(f"{spec.source}: network profiles run in the local network lab; the {backend} backend "
                            "has none (drop network/networks, or use --backend local)")
        try:
            check_available()
        except UserError as exc:
            raise UserError(f"{spec.source}: {exc}") from None
    too_big = [n for n in spec.world_sizes if spec.gpus_per_node and n > spec.gpus_per_node]
    if too_big and backend == "local":
        raise UserError(f"{spec.source}: world sizes {too_big} exceed gpus_per_node {spec.gpus_per_node}; "
                        "the local backend runs one machine (use a multi-node backend)")
    if backend == "local":
        check_gpu_world_sizes(spec.world_sizes)  # GPU machine: at most one process per visible GPU
    check_targets(spec, expand(spec))


def run_study(spec: StudySpec, out: Path, backend: Backend | None = None,
              progress: StudyProgress | None = None) -> list[PointRecord]:
    """Run every point not already done; returns the point records (done and new), in matrix order."""
    backend = backend or BACKENDS["local"]()
    preflight(spec, backend.name)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    records.write_yaml(out / "study.yaml", spec.raw)
    prog = progress or make_study_progress()
    try:
        with _lab(spec, prog.say) as lab:  # made before the matrix, removed after it on every way out
            if lab is None:
                _allreduce_bench(spec, out, backend, prog.say)
            else:
                _lab_bench(spec, out, backend, lab, prog.say)
            points = expand(spec, _max_batches(spec, out, backend, prog.say))
            prog.start(points)
            results = []
            for p in points:
                run_dir = out / p.run_name
                rec = read_done(run_dir, p)
                skipped = rec is not None
                if rec is None:
                    prog.begin(p, resume=p.script == TRAIN_MODULE and resumable(run_dir))
                    rec = run_point(p, spec, run_dir, backend, lab)
                prog.done(p, rec, run_summary(run_dir), skipped=skipped)
                results.append(rec)
    finally:
        prog.close()
    return results
