"""A self-contained package: build a wheel, install it into a fresh venv, and from a directory outside the checkout
run a training run, a 2-process study (world size asserted) and `cnnscale submit --dry-run`. Nothing rendered may
name a path inside the checkout.

To keep it fast the fresh venv (``venv --without-pip``) gets only the wheel (the dev venv's
``pip --python FRESH/bin/python install --no-deps``); the dependencies (torch, accelerate
...) come from the dev venv through a ``.pth`` file holding the dev venv's site-packages path. A path line in a .pth
file does not process that directory's own .pth files, so the dev venv's editable cnnscale stays inactive: the
test asserts that ``cnnscale`` is imported from the fresh venv. Run with ``-s`` to see the essential output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.slow]

_TOP_NOT_SOURCE = {".git", ".venv", "build", "dist", "runs", "data", ".cache", ".torch_extensions", ".pytest_cache",
                   ".ruff_cache"}  # at the checkout's top only: cnnscale/data/ is source


def _not_source(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == REPO
    return {n for n in names if (top and n in _TOP_NOT_SOURCE) or n == "__pycache__" or n.endswith(".egg-info")}


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ACCELERATE_USE_CPU", "CNNSCALE_ROOT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the checkout with only the wheel installed; returns its bin/ directory."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # a copy: an in-tree build would reuse a stale build/ (deleted modules would ship)
    shutil.copytree(REPO, src, symlinks=True, ignore=_not_source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
          str(src)], work, 300)
    (whl,) = (work / "dist").glob("cnnscale-*.whl")
    venv = work / "fresh"  # no pip of its own (ensurepip costs ~12 s): the dev venv's pip installs into it
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, 120)
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(whl)], work, 120)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     work, 60).strip())
    (site / "_cnnscale_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    print(f"\n[wheel] {whl.name} ({whl.stat().st_size // 1024} KiB) installed into {venv}")
    return venv / "bin"


def test_installed_package_is_the_wheel_and_ships_its_data(fresh, tmp_path):
    code = textwrap.dedent("""
        import cnnscale, json, importlib.util
        from cnnscale.resources import builtin_names, resource_path
        targets = [importlib.util.find_spec(m).origin for m in ("cnnscale.train", "cnnscale.study.allreduce_bench")]
        print(json.dumps({"file": cnnscale.__file__, "targets": targets, "studies": builtin_names("studies"),
                          "recipes": builtin_names("recipes"), "sbatch": str(resource_path("slurm/study.sbatch"))}))
    """)
    info = json.loads(_run([str(fresh / "python"), "-c", code], tmp_path, 60, _env()).strip().splitlines()[-1])
    venv = fresh.parent
    assert Path(info["file"]).is_relative_to(venv) and not Path(info["file"]).is_relative_to(REPO), info
    assert Path(info["sbatch"]).is_relative_to(venv) and Path(info["sbatch"]).is_file()
    assert all(Path(t).is_relative_to(venv) for t in info["targets"]), info  # the launch targets ship as modules
    assert {"quickstart", "cluster"} <= set(info["studies"]) and "lenet5" in info["recipes"]
    print(f"[wheel] cnnscale from {info['file']}; studies {info['studies']}, recipes {info['recipes']}")


def test_training_run_from_outside_the_checkout(fresh, tmp_path):
    out = tmp_path / "run"
    log = _run([str(fresh / "cnnscale"), "train", "--model", "lenet5", "--data", "synthetic", "--max-steps", "3",
                "--micro-batch", "16", "--data.synthetic_size", "128", "--data.val_size", "0", "--data.num_workers",
                "0", "--train.eval_every_epoch", "false", "--train.final_eval", "false", "--train.progress", "plain",
                "--out", str(out)], tmp_path, 240, _env())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["world_size"] == 1, log[-2000:]
    print(f"[wheel] cnnscale train: {summary['status']}, {summary['steps']} steps, world size {summary['world_size']}")


STUDY = """name: wheeltest
models: [{name: lenet5, micro_batches: [16]}]
world_sizes: [2]
max_steps: 3
data: synthetic
launcher: accelerate
threads_per_process: 1
timeout_s: 240
allreduce_bench: false     # its module ships (checked above) and runs in test_study's end-to-end study
overrides: {data.num_workers: 0, data.val_size: 0, data.synthetic_size: 256, train.eval_every_epoch: false,
            train.final_eval: false}
"""


def test_two_process_study_from_outside_the_checkout(fresh, tmp_path):
    (tmp_path / "wheeltest.yaml").write_text(STUDY)
    out = tmp_path / "out"
    text = _run([str(fresh / "cnnscale"), "study", "wheeltest.yaml", "--out", str(out)], tmp_path, 420, _env())
    run_dir = out / "lenet5-ws2-no-mb16"
    env, point = json.loads((run_dir / "env.json").read_text()), json.loads((run_dir / "point.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"] == "MULTI_CPU", "launcher silently ran world size 1"
    assert point["status"] == "ok" and point["world_size"] == 2, text[-3000:]
    launch = (run_dir / "launch.log").read_text().splitlines()[0]
    assert "-m cnnscale.train" in launch and str(fresh / "python") in launch and str(REPO) not in launch, launch
    assert "cnnscale scaling report" in text
    print(f"[wheel] study: {launch}\n[wheel] point {point['id']}: {point['status']}, env world_size "
          f"{env['world_size']} ({env['distributed_type']})")
    dry = _run([str(fresh / "cnnscale"), "study", "quickstart", "--dry-run", "--out", str(tmp_path / "q")], tmp_path,
               60, _env())  # a built-in study by name
    assert "-m cnnscale.train" in dry and str(REPO) not in dry


def test_submit_dry_run_names_no_checkout_path(fresh, tmp_path):
    script = _run([str(fresh / "cnnscale"), "submit", "--dry-run", "--nodes", "2", "--model", "lenet5",
                   "--max-steps", "10", "--runs", str(tmp_path / "runs")], tmp_path, 60, _env())
    assert str(REPO) not in script, "the rendered script names a path inside the checkout"
    assert f"export CNNSCALE_PYTHON={fresh / 'python'}" in script and "CNNSCALE_ROOT" not in script
    assert "TARGET=${CNNSCALE_TARGET:-cnnscale.train}" in script and "#SBATCH --nodes=2" in script
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from cnnscale.study.slurm import sbatch_command
        from cnnscale.study.spec import parse_spec
        spec = parse_spec({"name": "w", "models": ["lenet5"], "world_sizes": [2]})
        print(" ".join(sbatch_command(spec, (2, 1, False), 1, Path(sys.argv[1]) / "m.json", Path(sys.argv[1]), [])))
    """)
    array = _run([str(fresh / "python"), "-c", code, str(tmp_path)], tmp_path, 60, _env())
    assert str(REPO) not in array and str(fresh.parent) in array, array
    print(f"[wheel] submit --dry-run: {len(script.splitlines())} lines, no checkout path; "
          f"study array: {array.strip()[-160:]}")
