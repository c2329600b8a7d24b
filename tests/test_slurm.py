"""SLURM, against real daemons: a two-node job of slurm/train.sbatch, and preemption -> checkpoint -> requeue -> resume.
Plus the rendered sbatch text against a golden file, and `cnnscale submit`'s errors (these need no cluster).

The cluster is the one `bash slurm/local-cluster.sh start netns` starts (two nodes, node1 and node2, each in its own
network namespace with its own hostname, sharing this filesystem). Without it the cluster tests skip with the
reason; with CNNSCALE_REQUIRE_SLURM=1 (CI) a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PY, REPO, cpu_env, read_json

from cnnscale.study.submit import JobSpec, render

GOLDEN = Path(__file__).resolve().parent / "golden" / "train.sbatch"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TRAIN = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "2048", "--data.val_size", "0",
         "--data.num_workers", "0", "--micro-batch", "32", "--train.eval_every_epoch", "false",
         "--train.progress", "plain"]


# ---------------------------------------------------------------------------------------------- no cluster needed
def _golden_spec() -> JobSpec:
    return JobSpec(python="/opt/cnnscale/.venv/bin/python", runs="/scratch/runs",
                   train_args=("--model", "resnet18", "--config", "/opt/cnnscale/configs/recipes/resnet18.yaml",
                               "--max-steps", "2000", "--lr", "0.1", "--train.progress", "plain"),
                   nodes=2, gpus_per_node=8, cpus_per_task=32, partition="gpu", account="proj123",
                   time="1-00:00:00", job_name="resnet18", signal_lead_s=300, sbatch_opts=("--qos=high",))


def test_rendered_sbatch_matches_golden():
    text = render(_golden_spec())
    if os.environ.get("CNNSCALE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rendered script changed: review it, then CNNSCALE_UPDATE_GOLDEN=1 pytest ..."


def test_scripts_parse_as_bash(tmp_path):
    rendered = tmp_path / "r.sbatch"
    rendered.write_text(render(_golden_spec()))
    for name in ("train.sbatch", "study.sbatch", "local-cluster.sh"):
        subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True, timeout=30)
    subprocess.run(["bash", "-n", str(rendered)], check=True, timeout=30)


@pytest.mark.parametrize(("args", "needle"), [
    (["--time", "2h"], "not a SLURM time"), (["--nodes", "0"], "--nodes must be >= 1"),
    (["--out", "x"], "--out is set by the sbatch script"), (["--max-stepz", "3"], "unknown option --max-stepz"),
    (["--partition", "a b"], "--partition 'a b'")])
def test_submit_rejects_bad_input_in_one_line(args, needle):
    proc = subprocess.run([PY, "-m", "cnnscale", "submit", "--dry-run", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=cpu_env())
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_submit_without_sbatch_says_so(tmp_path):
    env = cpu_env(PATH=str(tmp_path))  # no sbatch anywhere on PATH
    proc = subprocess.run([PY, "-m", "cnnscale", "submit", "--model", "lenet5", "--runs", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2 and "'sbatch' not found on PATH" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- the real cluster
def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch not on PATH): start one with `sudo bash slurm/local-cluster.sh start netns`"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (slurmctld down?)"
    nodes = {line.split()[0] for line in out.stdout.splitlines()
             if line.split()[-1].rstrip("*") in ("idle", "mix", "alloc", "comp")}
    if out.returncode != 0 or len(nodes) < 2:
        return f"no two-node SLURM cluster up (sinfo: {out.stdout.strip() or out.stderr.strip()!r}); start one with " \
               "`sudo bash slurm/local-cluster.sh start netns`"
    mode = Path("/run/slurm-local/mode")
    if mode.exists() and mode.read_text().strip() != "netns":
        return f"the local cluster runs in {mode.read_text().strip()} mode, where both nodes share one hostname; " \
               "restart it with `bash slurm/local-cluster.sh start netns`"
    return None


@pytest.fixture(scope="module")
def cluster(skip_or_fail) -> None:
    problem = _cluster_problem()
    if problem:
        skip_or_fail(problem)


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    return bool(out.stdout.strip())


def _wait_done(job_id: str, log: Path, timeout: float) -> dict[str, str]:
    """Poll squeue/scontrol until the job has left the queue in a final state; cancel it on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(job_id)
        if info.get("JobState") in FINAL and not _in_queue(job_id):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=20)
    text = log.read_text()[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"job {job_id} not done within {timeout:.0f} s (state {_job(job_id).get('JobState')}):\n{text}")


def _sacct_states(job_id: str) -> list[str]:
    """Allocation records of every run of the job (sacct --duplicates), once accounting has them; [] without sacct."""
    for _ in range(20):
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            return []
        states = [s.split()[0] for s in out.stdout.split()]
        if states and states[-1] in FINAL:
            return states
        time.sleep(0.5)
    return states


def test_two_node_job_trains_on_both_nodes(cluster, tmp_path):
    args = [*TRAIN, "--max-steps", "40", "--train.log_every", "10"]
    t0 = time.monotonic()
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--job-name=cns-2node",
         f"--output={tmp_path}/%x-%j.out", f"--export=ALL,CNNSCALE_RUNS={tmp_path},CNNSCALE_PYTHON={PY}",
         str(REPO / "slurm" / "train.sbatch"), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    job_id = out.stdout.strip().split(";")[0]
    log = tmp_path / f"cns-2node-{job_id}.out"
    info = _wait_done(job_id, log, timeout=420)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    run_dir = tmp_path / f"cns-2node-{job_id}"
    summary, env = read_json(run_dir / "summary.json"), read_json(run_dir / "env.json")
    assert summary["status"] == "ok" and summary["steps"] == 40 and summary["world_size"] == 2
    assert env["world_size"] == 2 and env["num_nodes"] == 2 and sorted(env["hostnames"]) == ["node1", "node2"]
    assert env["backend"] == "gloo" and env["slurm"]["SLURM_JOB_ID"] == job_id
    assert "machine_rank 0 of 2" in text and "machine_rank 1 of 2" in text and "gloo via eth0" in text
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "step_00000040").is_dir()
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [10, 20, 30, 40]
    print(f"\ntwo-node job {job_id}: sbatch -> COMPLETED in {elapsed:.1f} s")


def _wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float) -> None:
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.exists() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()
                                    if x.strip().endswith("}")):
            return
        if _job(job_id).get("JobState") in FINAL:
            pytest.fail(f"job {job_id} ended before step {step}")
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=20)
    pytest.fail(f"job {job_id} reached no step {step} within {timeout} s")


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    total = 600
    out = subprocess.run([PY, "-m", "cnnscale", "submit", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task",
                          "1", "--job-name", "cns-pre", "--runs", str(tmp_path), *TRAIN, "--max-steps", str(total),
                          "--train.log_every", "1"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env=cpu_env(), check=True)
    job_id = out.stdout.split()[0]
    run_dir, log = tmp_path / f"cns-pre-{job_id}", tmp_path / f"cns-pre-{job_id}.out"
    try:
        _wait_for_step(run_dir, job_id, 5, timeout=300)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=20)
        info = _wait_done(job_id, log, timeout=600)
    finally:
        if _in_queue(job_id):
            subprocess.run(["scancel", job_id], timeout=20)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, text[-4000:]
    states = _sacct_states(job_id)
    assert not states or states[0] == "REQUEUED" and states[-1] == "COMPLETED", states

    at_signal = int(re.search(r"preempted by SIGUSR1 at step (\d+)/", text).group(1))
    assert 5 <= at_signal < total
    assert f"resuming from {run_dir}/checkpoints/step_{at_signal:08d}" in text
    assert (run_dir / "checkpoints" / f"step_{at_signal:08d}" / "trainer_state.json").is_file()
    env, summary = read_json(run_dir / "env.json"), read_json(run_dir / "summary.json")
    assert env["slurm"]["SLURM_RESTART_COUNT"] == "1" and env["world_size"] == 2 and env["num_nodes"] == 2
    assert summary["status"] == "ok" and summary["steps"] == total
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # each step logged once: the requeued run went on from at_signal + 1 (a restart from 0 would repeat 1..at_signal)
    assert [r["step"] for r in recs] == list(range(1, total + 1))
    assert text.count("preempted by SIGUSR1") == 1 and text.count("resuming from") == 1
    print(f"\npreempted job {job_id}: signal at step {at_signal}, resumed at step {at_signal + 1}, "
          f"final step {summary['steps']}, sacct {states}")


STUDY = """name: slurmtest
models: [{name: lenet5, micro_batches: [32]}]
world_sizes: [1, 2]
gpus_per_node: 1          # a CPU study: one process per node, so world size 2 spans both nodes
threads_per_process: 1
max_steps: 10
data: synthetic
timeout_s: 300
allreduce_bench: false
overrides: {data.num_workers: 0, data.val_size: 0, data.synthetic_size: 512, data.limit_test: 64,
            train.eval_every_epoch: false, train.log_every: 5}
"""


def test_study_runs_points_as_job_arrays_and_reports(cluster, tmp_path):
    spec, out = tmp_path / "study.yaml", tmp_path / "out"
    spec.write_text(STUDY)
    cmd = [PY, "-m", "cnnscale", "study", str(spec), "--slurm", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted array" in proc.stdout and "cnnscale scaling report" in proc.stdout
    for ws, hosts in ((1, 1), (2, 2)):
        run_dir = out / f"lenet5-ws{ws}-no-mb32"
        summary, env = read_json(run_dir / "summary.json"), read_json(run_dir / "env.json")
        point = read_json(run_dir / "point.json")
        assert summary["status"] == "ok" and summary["world_size"] == ws and point["study"] == "slurmtest"
        assert point["status"] == "ok" and point["backend"] == "slurm" and point["job_id"]
        assert env["num_nodes"] == hosts and "SLURM_ARRAY_JOB_ID" in env["slurm"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=cpu_env())
    assert again.returncode == 0 and "2 points, 2 done earlier" in again.stdout and "submitted" not in again.stdout
