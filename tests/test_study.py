"""`cnnscale study`: matrix expansion, batch rules, failure classification, and real launches (resume, crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnscale.errors import UserError
from cnnscale.study import launcher
from cnnscale.study import local as study
from cnnscale.study.spec import parse_spec, strong_batch

REPO = Path(__file__).resolve().parent.parent
BASE = {"name": "t", "models": ["lenet5", {"name": "resnet18", "micro_batches": [8], "max_steps": 3}],
        "world_sizes": [1, 2, 4], "micro_batches": [16, 32], "max_steps": 5}


def test_weak_matrix_expands_models_settings_precisions_batches_world_sizes():
    spec = parse_spec({**BASE, "precisions": ["no", "bf16"], "settings": {"default": {}, "hook": {"dist": {
        "comm_hook": "bf16"}}}})
    points = study.expand(spec)
    # lenet5: 2 settings x 2 precisions x 2 batches x 3 sizes; resnet18: 2 x 2 x 1 x 3
    assert len(points) == 24 + 12
    p = next(p for p in points if p.id == "lenet5-ws4-bf16-mb32-hook")
    assert p.global_batch == 128 and ("dist.comm_hook", "bf16") in p.overrides
    r = [p for p in points if p.model == "resnet18"]
    assert {p.micro_batch for p in r} == {8} and {p.max_steps for p in r} == {3}
    assert [p.world_size for p in points[:3]] == [1, 2, 4]  # world size innermost


def test_strong_rule_fixed_global_batch():
    assert strong_batch(256, 1) == (256, 1)
    assert strong_batch(256, 4) == (64, 1)
    assert strong_batch(256, 1, max_micro=64) == (64, 4)  # grad_accum doubles while micro > cap
    with pytest.raises(UserError, match="not divisible"):
        strong_batch(100, 3)
    with pytest.raises(UserError, match="min_micro_batch"):
        strong_batch(64, 8, min_micro=16)
    spec = parse_spec({**BASE, "models": ["lenet5"], "scaling": "strong", "global_batch": 64, "world_sizes": [1, 2]})
    assert [(p.micro_batch, p.grad_accum, p.global_batch) for p in study.expand(spec)] == [(64, 1, 64), (32, 1, 64)]


def test_bad_study_files_are_one_line_errors():
    with pytest.raises(UserError, match="unknown key 'modles'.*valid keys"):
        parse_spec({**BASE, "modles": []})
    with pytest.raises(UserError, match="choose from: no, fp16, bf16"):
        parse_spec({**BASE, "precisions": ["fp8"]})
    with pytest.raises(UserError, match="strong scaling needs global_batch"):
        parse_spec({**BASE, "scaling": "strong"})
    with pytest.raises(UserError, match="world_sizes must be integers"):
        parse_spec({**BASE, "world_sizes": [0]})


def test_builtin_studies_parse():
    for name in ("quickstart", "gpu", "cluster", "efficiency"):
        spec = study.load_spec(REPO / "configs" / "studies" / f"{name}.yaml")
        assert study.expand(spec)


def test_launch_commands():
    assert launcher.build_command("t.py", ["--a"], 1, 0, python="/v/bin/python") == ["/v/bin/python", "t.py", "--a"]
    cmd = launcher.build_command("t.py", [], 2, 29777, python="/nonexistent/python")
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    cmd = launcher.build_command("t.py", [], 2, 29777, "torchrun", python="/nonexistent/python")
    assert "127.0.0.1:29777" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert launcher.point_env(1, {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in launcher.point_env(0, {})


def test_failure_classification():
    assert launcher.classify_failure(None, "", timed_out=True)[0] == "timeout"
    log = "Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nChildFailedError: x"
    assert launcher.classify_failure(1, log) == ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to "
                                                        "allocate 2.00 GiB")
    assert launcher.classify_failure(-9, "")[0] == "oom"
    st, err = launcher.classify_failure(1, "ValueError: bad shape\ntorch.distributed.elastic...ChildFailedError: ")
    assert st == "failed" and err == "exit 1: ValueError: bad shape"
    assert launcher.classify_failure(0, "fine") == ("ok", "")


def test_max_batch_search_halves_on_oom():
    tried = []

    def probe(bs: int) -> str:
        tried.append(bs)
        return "ok" if bs <= 100 else "oom"

    assert study.find_max_batch(probe, 1024) == 64
    assert tried == [1024, 512, 256, 128, 64]


def _study_file(tmp: Path) -> Path:
    """A reduced copy of the quickstart: lenet5 at 1 and 2 processes, plus a model that crashes in the subprocess."""
    spec = yaml.safe_load((REPO / "configs" / "studies" / "quickstart.yaml").read_text())
    spec.update(name="mini", models=[{"name": "lenet5", "micro_batches": [32], "max_steps": 4},
                                     {"name": "no_such_net", "max_steps": 2}], timeout_s=180)
    spec["world_sizes"] = [1, 2]
    spec["overrides"]["data.synthetic_size"] = 256
    path = tmp / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _study(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cnnscale", "study", *args, "--timeout", "180"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_reduced_quickstart_end_to_end_crash_recorded_and_resume(tmp_path):
    out = tmp_path / "runs"
    no_such = ["no_such_net-ws1-no-mb16", "no_such_net-ws2-no-mb16"]
    first = _study([str(_study_file(tmp_path)), "--out", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    for ws in (1, 2):
        d = out / f"lenet5-ws{ws}-no-mb32"
        assert json.loads((d / "env.json").read_text())["world_size"] == ws, "launcher silently ran world size 1"
        assert json.loads((d / "summary.json").read_text())["status"] == "ok"
    for pid in no_such:
        s = json.loads((out / pid / "summary.json").read_text())
        assert s["status"] == "failed" and "unknown model 'no_such_net'" in s["error"] and s["point"]["id"] == pid
    assert (out / "allreduce.json").is_file() and (out / "plots" / "efficiency.png").is_file()
    assert "cnnscale scaling report" in first.stdout and "FAILED" in first.stdout
    mtime = (out / "lenet5-ws2-no-mb32" / "summary.json").stat().st_mtime
    ok = [d.name for d in out.iterdir() if (d / "summary.json").is_file()
          and json.loads((d / "summary.json").read_text())["status"] == "ok"]
    assert len(ok) >= 2 and not any(n.startswith("no_such_net") for n in ok)
    second = _study([str(_study_file(tmp_path)), "--out", str(out)])
    assert second.returncode == 0, second.stderr[-3000:]
    # the failed points run again, the done ones (lenet5 at both world sizes, and its compute_only calibration) do not
    assert second.stdout.count("done earlier, skipped") == len(ok)
    assert (out / "lenet5-ws2-no-mb32" / "summary.json").stat().st_mtime == mtime


def test_abort_at_exit_after_a_complete_run_is_judged_by_the_run_record(tmp_path):
    """A rank's "terminate called without an active exception" at interpreter exit, after rank 0 wrote an ok
    summary for every step, leaves the point ok (with a warning); the same abort before completion stays failed."""
    spec = parse_spec({**BASE, "models": ["lenet5"], "world_sizes": [2]})
    p = study.expand(spec)[0]
    log = "step 10\nterminate called without an active exception\nChildFailedError: exitcode -6\n"
    for steps, want in ((p.max_steps, "ok"), (p.max_steps - 1, "failed")):
        run_dir = tmp_path / f"s{steps}"
        run_dir.mkdir()
        (run_dir / "launch.log").write_text(log)
        (run_dir / "summary.json").write_text(json.dumps({"status": "ok", "world_size": 2, "steps": steps}))
        s = study._record(run_dir, p, spec, "failed", "exit 1: rank 1 SIGABRT", 3.0)
        assert s["status"] == want
        assert ("exit_warning" in s) == (want == "ok")
        assert json.loads((run_dir / "summary.json").read_text())["status"] == want
