"""Two machines without SLURM: two `accelerate launch` processes (--num_machines 2, machine ranks 0 and 1) in two
network namespaces joined by a veth pair, each with its own address and hostname, train LeNet-5 (no BatchNorm) to
the same weights as one process with the same global batch.

Needs root, `ip` and `unshare`; skips with the reason otherwise (fails instead when CNNSCALE_REQUIRE_SLURM=1, as
in CI, since the SLURM tests need the same privileges).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, REPO, cpu_env, final_weights, max_abs_diff, read_json, run, train_cmd

pytestmark = [pytest.mark.netns]

PORT = 29813
BASE = ["--model", "lenet5", "--data", "synthetic", "--data.synthetic_size", "2048", "--data.val_size", "0",
        "--data.num_workers", "0", "--optim.weight_decay", "0", "--lr", "0.05", "--sched.name", "none",
        "--train.log_every", "5", "--train.eval_every_epoch", "false", "--train.progress", "plain",
        "--max-steps", "20"]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [c for c in ("ip", "unshare") if shutil.which(c) is None]
    return f"needs {', '.join(missing)} on PATH" if missing else None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=30, capture_output=True)


@pytest.fixture
def netns_pair(skip_or_fail):
    """Namespaces A (10.206.6.1) and B (10.206.6.2) joined by a veth pair; names unique to this test process."""
    reason = _unavailable()
    if reason:
        skip_or_fail(reason)
    tag = f"cn{os.getpid() % 100000}"
    nodes = [(f"{tag}a", f"{tag}va", "10.206.6.1"), (f"{tag}b", f"{tag}vb", "10.206.6.2")]
    try:
        for ns, _, _ in nodes:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", nodes[0][1], "netns", nodes[0][0], "type", "veth", "peer", "name", nodes[1][1],
            "netns", nodes[1][0])
        for ns, dev, addr in nodes:
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns, _, _ in nodes:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], timeout=30, capture_output=True)


def _launcher(ns: str, dev: str, host: str, rank: int, head: str, out: Path) -> subprocess.Popen:
    # own UTS namespace: a distinct hostname per "machine", so env.json can show two nodes
    cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh",
           str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
           "--machine_rank", str(rank), "--main_process_ip", head, "--main_process_port", str(PORT),
           "--rdzv_backend", "static", str(REPO / "launch" / "train.py"), *BASE, "--micro-batch", "16",
           "--out", str(out)]
    env = cpu_env(GLOO_SOCKET_IFNAME=dev)  # without it gloo advertises 127.0.0.1 and rank 1 cannot connect
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_two_machines_in_namespaces_match_one_process(tmp_path, netns_pair):
    out = tmp_path / "two"
    head = netns_pair[0][2]
    procs = [_launcher(ns, dev, f"machine{r}", r, head, out) for r, (ns, dev, _) in enumerate(netns_pair)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("two-machine run did not finish within 300 s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    summary = read_json(out / "summary.json")
    assert summary["status"] == "ok", "\n".join(x[-3000:] for x in logs)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]  # an abort at exit is a failure, not a message to match
    env = read_json(out / "env.json")
    assert env["world_size"] == 2 and env["distributed_type"] == "MULTI_CPU" and env["backend"] == "gloo"
    assert env["num_nodes"] == 2 and sorted(env["hostnames"]) == ["machine0", "machine1"]
    assert summary["global_batch"] == 32 and summary["steps"] == 20

    single = tmp_path / "one"
    run(train_cmd([*BASE, "--micro-batch", "32", "--out", str(single)]), timeout=240)
    assert max_abs_diff(final_weights(out), final_weights(single)) < 1e-5
