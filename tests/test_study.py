"""`cnnscale study`: matrix expansion, batch rules, failure classification, point.json, and real launches (resume,
crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnscale.errors import UserError
from cnnscale.records.schema import Summary, read_point, write_summary
from cnnscale.resources import builtin_names, find_builtin
from cnnscale.study import launcher
from cnnscale.study import matrix as study
from cnnscale.study.local import find_max_batch
from cnnscale.study.outcome import is_done, record_point
from cnnscale.study.spec import load_spec, parse_spec, strong_batch

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
        spec = load_spec(REPO / "configs" / "studies" / f"{name}.yaml")
        assert study.expand(spec)


def test_builtin_studies_are_found_by_name_and_paths_still_work(tmp_path):
    names = builtin_names("studies")
    assert {"quickstart", "gpu", "cluster", "efficiency"} <= set(names)
    by_name = find_builtin("studies", "quickstart")
    assert by_name.is_file() and by_name.parent.parent.parent.name == "resources"  # package data, not the checkout
    assert by_name.read_text() == (REPO / "configs" / "studies" / "quickstart.yaml").read_text()  # one copy
    assert find_builtin("studies", "quickstart.yaml") == by_name
    own = tmp_path / "quickstart"  # an existing file wins over the built-in name
    own.write_text("name: own\nmodels: [lenet5]\n")
    assert find_builtin("studies", own) == own
    with pytest.raises(UserError, match=r"no study file or built-in study 'nope' \(built-in: " + ", ".join(names)):
        find_builtin("studies", "nope")
    with pytest.raises(UserError, match="no study file"):
        find_builtin("studies", "sub/quickstart")  # a path that does not exist is not a name


def test_launch_commands():
    assert launcher.build_command("t.py", ["--a"], 1, 0, python="/v/bin/python") == ["/v/bin/python", "t.py", "--a"]
    assert launcher.build_command("cnnscale.train", ["--a"], 1, 0, python="/v/bin/python") == [
        "/v/bin/python", "-m", "cnnscale.train", "--a"]
    cmd = launcher.build_command("cnnscale.train", ["--a"], 2, 29777, python="/nonexistent/python")
    assert cmd[-3:] == ["-m", "cnnscale.train", "--a"] and cmd.count("-m") == 2  # the launcher's, the target's
    cmd = launcher.build_command("cnnscale.train", [], 2, 29777, "torchrun", python="/nonexistent/python")
    assert cmd[-2:] == ["-m", "cnnscale.train"] and cmd[:3] == ["/nonexistent/python", "-m", "torch.distributed.run"]
    cmd = launcher.build_command("t.py", [], 2, 29777, python="/nonexistent/python")
    # no launcher executable next to the interpreter: its module, under that interpreter (not whatever PATH has)
    assert cmd[:3] == ["/nonexistent/python", "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    venv_cmd = launcher.build_command("t.py", [], 2, 29777)  # the dev venv has the executable
    assert venv_cmd[:2] == [str(Path(sys.executable).parent / "accelerate"), "launch"]
    cmd = launcher.build_command("t.py", [], 2, 29777, "torchrun", python="/nonexistent/python")
    assert "127.0.0.1:29777" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    # direct: the target itself, started once per rank with the env:// rendezvous on this machine
    assert launcher.build_command("t.py", ["--a"], 2, 29777, "direct", python="/v/bin/python") == [
        "/v/bin/python", "t.py", "--a"]
    envs = launcher.direct_envs({"OMP_NUM_THREADS": "1"}, 2, 29777)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2", "2"), ("1", "1", "2", "2")]
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == "29777" and e["OMP_NUM_THREADS"] == "1"
               for e in envs)
    assert launcher.point_env(1, {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in launcher.point_env(0, {})
    assert "PYTHONPATH" not in launcher.point_env(1, {})  # the installed package, not a checkout on the path


def test_failure_classification():
    assert launcher.classify_failure(None, "", timed_out=True)[0] == "timeout"
    log = "Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nChildFailedError: x"
    assert launcher.classify_failure(1, log) == ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to "
                                                        "allocate 2.00 GiB")
    assert launcher.classify_failure(-9, "")[0] == "oom"  # the kernel keeps no count: the likeliest reading
    assert launcher.classify_failure(-9, "", oom_killed=1)[0] == "oom"
    st, err = launcher.classify_failure(-9, "", oom_killed=0)  # SIGKILL by hand, the OOM killer idle
    assert (st, err) == ("failed", "killed by SIGKILL, not by the OOM killer (/proc/vmstat oom_kill unchanged): "
                                   "killed by hand?")
    assert isinstance(launcher.oom_kills(), int)  # Linux 4.13+: /proc/vmstat counts them
    st, err = launcher.classify_failure(1, "ValueError: bad shape\ntorch.distributed.elastic...ChildFailedError: ")
    assert st == "failed" and err == "exit 1: ValueError: bad shape"
    assert launcher.classify_failure(0, "fine") == ("ok", "")


def test_max_batch_search_halves_on_oom():
    tried = []

    def probe(bs: int) -> str:
        tried.append(bs)
        return "ok" if bs <= 100 else "oom"

    assert find_max_batch(probe, 1024) == 64
    assert tried == [1024, 512, 256, 128, 64]


def _study_file(tmp: Path) -> Path:
    """A reduced copy of the quickstart: lenet5 at 1 and 2 processes, plus a model that crashes in the subprocess.
    The default settings only: the compute_only variant's launches are tests/test_train.py's and test_commhook.py's."""
    spec = yaml.safe_load((REPO / "configs" / "studies" / "quickstart.yaml").read_text())
    spec.update(name="mini", models=[{"name": "lenet5", "micro_batches": [32], "max_steps": 4},
                                     {"name": "no_such_net", "max_steps": 2}], timeout_s=180,
                repeats=1, settings={"default": {}})  # one pass: the repeats are tests/test_repeats.py's
    spec["world_sizes"] = [1, 2]
    spec["overrides"]["data.synthetic_size"] = 256
    path = tmp / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _study(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, from anywhere
    return subprocess.run([sys.executable, "-m", "cnnscale", "study", *args, "--timeout", "180"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_reduced_quickstart_end_to_end_crash_recorded_and_resume(tmp_path):
    out = tmp_path / "runs"
    no_such = ["no_such_net-ws1-no-mb16", "no_such_net-ws2-no-mb16"]
    first = _study([str(_study_file(tmp_path)), "--out", str(out)], tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]  # a failed point: exit 1, after the report (issue 15)
    assert "study mini: 4 points: 2 ok, 2 failed, " in first.stderr.strip().splitlines()[-1]
    for ws in (1, 2):
        d = out / f"lenet5-ws{ws}-no-mb32"
        assert json.loads((d / "env.json").read_text())["world_size"] == ws, "launcher silently ran world size 1"
        assert json.loads((d / "summary.json").read_text())["status"] == "ok"
        assert json.loads((d / "point.json").read_text())["status"] == "ok"
    for pid in no_such:  # the study's judgement is point.json; summary.json belongs to the trainer alone
        s = json.loads((out / pid / "point.json").read_text())
        assert s["status"] == "failed" and "unknown model 'no_such_net'" in s["error"] and s["id"] == pid
        assert s["seconds"] > 0 and s["study"] == "mini"
    assert (out / "allreduce.json").is_file() and (out / "plots" / "efficiency.png").is_file()
    assert "cnnscale scaling report" in first.stdout and "FAILED" in first.stdout
    mtime = (out / "lenet5-ws2-no-mb32" / "summary.json").stat().st_mtime
    ok = [d.name for d in out.iterdir() if (d / "point.json").is_file()
          and json.loads((d / "point.json").read_text())["status"] == "ok"]
    assert len(ok) >= 2 and not any(n.startswith("no_such_net") for n in ok)
    second = _study([str(_study_file(tmp_path)), "--out", str(out)], tmp_path)
    assert second.returncode == 1, second.stderr[-3000:]  # no_such_net fails again
    # the failed points run again, the done ones (lenet5 at both world sizes) do not
    assert second.stdout.count("done earlier, skipped") == len(ok)
    assert (out / "lenet5-ws2-no-mb32" / "summary.json").stat().st_mtime == mtime


def test_point_json_judges_the_launch_and_never_touches_summary(tmp_path):
    """The study writes its judgement to point.json. A failed launch stays failed whatever summary.json says (no
    "failed" turned into "ok"); an ok launch needs an ok summary at the point's world size; summary.json is never
    rewritten; resume needs both records ok."""
    spec = parse_spec({**BASE, "models": ["lenet5"], "world_sizes": [2]})
    p = study.expand(spec)[0]
    cases = [("failed", {"status": "ok", "world_size": 2, "steps": p.max_steps}, "failed"),  # a rank aborted
             ("ok", {"status": "ok", "world_size": 2, "steps": p.max_steps}, "ok"),
             ("ok", {"status": "ok", "world_size": 1, "steps": p.max_steps}, "failed"),  # silently world size 1
             ("ok", None, "failed")]
    for i, (launch, summary, want) in enumerate(cases):
        run_dir = tmp_path / f"c{i}"
        run_dir.mkdir()
        if summary is not None:
            write_summary(run_dir, Summary(**summary))
        before = (run_dir / "summary.json").read_bytes() if summary is not None else None
        rec = record_point(run_dir, p, spec.name, launch, "exit 1: rank 1 SIGABRT" if launch == "failed" else "",
                           3.0)
        assert rec.status == want and read_point(run_dir) == rec, (i, rec)
        assert (rec.error is None) == (want == "ok")
        assert rec.world_size == 2 and rec.global_batch == p.global_batch and rec.seconds == 3.0
        after = (run_dir / "summary.json").read_bytes() if summary is not None else None
        assert after == before and (summary is not None or not (run_dir / "summary.json").exists())
        assert is_done(run_dir, p) == (want == "ok")
    assert "launched world size 1, expected 2" in read_point(tmp_path / "c2").error


def test_study_and_submit_commands_import_no_torch(tmp_path):
    """`cnnscale study` and `cnnscale submit` stay light (torch is 8-9 s and 0.8 GB): every point is a subprocess."""
    code = ("import sys\nfrom cnnscale.cli import main\n"
            f"assert main(['study', 'quickstart', '--dry-run', '--out', {str(tmp_path)!r}]) == 0\n"
            "assert main(['submit', '--dry-run', '--model', 'lenet5']) == 0\n"
            "import cnnscale.study.slurm, cnnscale.study.local\n"
            "print('heavy:', sorted(m for m in ('torch', 'accelerate', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy: []" in proc.stdout
    assert "-m cnnscale.train" in proc.stdout and "todo  lenet5-ws1-no-mb64" in proc.stdout


def test_unknown_study_name_is_one_line_listing_the_builtins(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnscale", "study", "quickstrat"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no study file or built-in study 'quickstrat' (built-in: " in proc.stderr
    assert all(n in proc.stderr for n in builtin_names("studies"))
