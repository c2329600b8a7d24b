"""Adversarial input suite: every bad input is one line on stderr naming the problem, exit code 2, no traceback
(``--debug`` shows one), and no partial run directory (``--out`` does not exist afterwards; a directory that existed
is unchanged). Each case is a real process running ``python launch/train.py ...`` or ``python -m cnnscale ...``:
the cases in ``PLAIN`` (one per phase that can fail: flags, model, data, checkpoint; and every ``--debug`` run) as
plain subprocesses, which also catch anything printed while torch and DeepSpeed import; the others forked from a
zygote that imported torch once (tests/zygote.py), which saves 5-10 s of CPU per case on a 2-core box.

The cases run concurrently in one module fixture.
Disk full is in tests/test_faults.py (it must write before it can fail); so is the 2-process data check below's
sibling, the dead rank.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zygote

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = str(REPO / "launch" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
ENV.pop("CNNSCALE_DEBUG", None)
BASE = ["--model", "lenet5", "--data", "synthetic", "--max-steps", "2", "--micro-batch", "8",
        "--data.num_workers", "0", "--data.val_size", "0", "--data.synthetic_size", "64", "--train.progress", "none",
        "--profile.enabled", "false"]


@dataclass
class Ctx:
    tmp: Path
    ckpt_run: Path  # a finished run with checkpoints/step_00000002
    ro_dir: Path | None  # a read-only mount, or None where mounting is not allowed

    def file(self, name: str, text: str) -> str:
        p = self.tmp / name
        p.write_text(text)
        return str(p)

    def out(self, case: str) -> Path:
        return self.tmp / f"out-{case}"

    def ckpt_copy(self, case: str, damage: Callable[[Path], None]) -> Path:
        run = self.tmp / f"resume-{case}"
        while run.exists():  # the --debug rerun gets its own copy
            run = run.with_name(run.name + "-again")
        shutil.copytree(self.ckpt_run, run)
        # as if killed before its end: resuming a finished run is a no-op that never loads the checkpoint (issue 15.1)
        (run / "summary.json").write_text('{"status": "running", "schema_version": 1}\n')
        damage(run / "checkpoints" / "step_00000002")
        return run


def truncate(name: str) -> Callable[[Path], None]:
    def damage(ck: Path) -> None:
        f = ck / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return damage


class _Payload:
    """Unpickling this calls open(marker, 'w'): proof of arbitrary code if a loader runs it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def foreign_pickle(ctx: Ctx) -> Callable[[Path], None]:
    def damage(ck: Path) -> None:
        torch.save({"last_epoch": 1, "x": _Payload(str(ctx.tmp / "PWNED"))}, ck / "custom_checkpoint_0.pkl")
    return damage


def make_empty_imagefolder(ctx: Ctx) -> str:
    for split in ("train", "test"):
        (ctx.tmp / "emptyif" / split).mkdir(parents=True, exist_ok=True)
    return str(ctx.tmp / "emptyif")


def make_train_only_imagefolder(ctx: Ctx) -> str:
    from PIL import Image

    d = ctx.tmp / "trainonly" / "train" / "cat"
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(d / "0.jpg")
    return str(ctx.tmp / "trainonly")


def make_one_class_imagefolder(ctx: Ctx) -> str:
    from PIL import Image

    for split in ("train", "test"):
        d = ctx.tmp / "oneclass" / split / "cat"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(d / f"{i}.png")
    return str(ctx.tmp / "oneclass")


# "billion laughs": 9 levels of 10 aliases, 10**9 leaves when expanded, 343 bytes, under a known key
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "sched:\n  milestones: *i\n"


def bytes_file(ctx: Ctx, name: str, data: bytes) -> str:
    p = ctx.tmp / name
    p.write_bytes(data)
    return str(p)


def empty_dir(ctx: Ctx, name: str) -> str:
    (ctx.tmp / name).mkdir(exist_ok=True)
    return str(ctx.tmp / name)


def foreign_dir(ctx: Ctx) -> str:
    d = ctx.tmp / "foreign" / "sub"
    d.mkdir(parents=True, exist_ok=True)
    (ctx.tmp / "foreign" / "notes.txt").write_text("hello\n")
    (d / "data.csv").write_text("a,b\n1,2\n")
    return str(ctx.tmp / "foreign")


# (kind, build(ctx) -> (argv after `python`, the directory that must stay absent/unchanged), expected message)
T = [TRAIN]
CASES: dict[str, tuple[Callable[[Ctx], tuple[list[str], Path]], str]] = {
    "unknown-model": (lambda c: ([*T, *BASE, "--model", "nope", "--out", str(c.out("m"))], c.out("m")),
                      r"unknown model 'nope' \(choose from: .*lenet5.*resnet18"),
    "unknown-optimiser": (lambda c: ([*T, *BASE, "--optim.name", "lamb", "--out", str(c.out("o"))], c.out("o")),
                          r"optim\.name: unknown value 'lamb' \(choose from: sgd, adam, adamw, rmsprop\)"),
    "unknown-scheduler": (lambda c: ([*T, *BASE, "--sched.name", "poly", "--out", str(c.out("s"))], c.out("s")),
                          r"sched\.name: unknown value 'poly' \(choose from: none, step"),
    "yaml-syntax-error": (lambda c: ([*T, "--config", c.file("syn.yaml", "train:\n  lr: [1\n"), *BASE,
                                      "--out", str(c.out("y1"))], c.out("y1")),
                          r"syn\.yaml: YAML syntax error at line \d+, column \d+"),
    "yaml-unknown-key": (lambda c: ([*T, "--config", c.file("key.yaml", "train:\n  lrr: 1\n"), *BASE,
                                     "--out", str(c.out("y2"))], c.out("y2")),
                         r"key\.yaml: unknown key 'train\.lrr' \(valid keys: epochs, max_steps"),
    "yaml-wrong-type": (lambda c: ([*T, "--config", c.file("typ.yaml", "train:\n  micro_batch: lots\n"), *BASE,
                                    "--out", str(c.out("y3"))], c.out("y3")),
                        r"train\.micro_batch: expected an integer, got 'lots'"),
    "yaml-not-a-mapping": (lambda c: ([*T, "--config", c.file("list.yaml", "- a\n- b\n"), *BASE,
                                       "--out", str(c.out("y4"))], c.out("y4")),
                           r"list\.yaml: expected a mapping of sections, got list"),
    "config-file-missing": (lambda c: ([*T, "--config", str(c.tmp / "nope.yaml"), *BASE,
                                        "--out", str(c.out("y5"))], c.out("y5")),
                            r"config file not found: .*nope\.yaml"),
    "lr-negative": (lambda c: ([*T, *BASE, "--lr", "-0.1", "--out", str(c.out("l1"))], c.out("l1")),
                    r"optim\.lr must be > 0, got -0\.1"),
    "lr-zero": (lambda c: ([*T, *BASE, "--lr", "0", "--out", str(c.out("l2"))], c.out("l2")),
                r"optim\.lr must be > 0, got 0\.0"),
    "lr-not-a-number": (lambda c: ([*T, *BASE, "--lr", "fast", "--out", str(c.out("l3"))], c.out("l3")),
                        r"optim\.lr: expected a number, got 'fast'"),
    "batch-zero": (lambda c: ([*T, *BASE, "--micro-batch", "0", "--out", str(c.out("b1"))], c.out("b1")),
                   r"train\.micro_batch must be >= 1, got 0"),
    "epochs-negative": (lambda c: ([*T, *BASE, "--epochs", "-1", "--out", str(c.out("e1"))], c.out("e1")),
                        r"train\.epochs must be >= 0, got -1"),
    "grad-accum-negative": (lambda c: ([*T, *BASE, "--grad-accum", "-2", "--out", str(c.out("g1"))], c.out("g1")),
                            r"train\.grad_accum must be >= 1, got -2"),
    "mixed-precision-unknown": (lambda c: ([*T, *BASE, "--mixed-precision", "fp8", "--out", str(c.out("p1"))],
                                           c.out("p1")),
                                r"train\.mixed_precision: unknown value 'fp8' \(choose from: no, fp16, bf16\)"),
    "unknown-section": (lambda c: ([*T, *BASE, "--optimizer.lr", "1", "--out", str(c.out("u1"))], c.out("u1")),
                        r"unknown section 'optimizer' \(choose from: model, data, optim"),
    "unknown-flag": (lambda c: ([*T, *BASE, "--bogus", "1", "--out", str(c.out("u2"))], c.out("u2")),
                     r"unknown option --bogus \(valid: --model, --data"),
    "flag-without-value": (lambda c: ([*T, *BASE, "--out", str(c.out("u3")), "--lr"], c.out("u3")),
                           r"--lr needs a value"),
    "model-bad-argument": (lambda c: ([*T, *BASE, "--model.width_mult", "0.5", "--out", str(c.out("u4"))],
                                      c.out("u4")),
                           r"model 'lenet5' does not take width_mult \(it takes: num_classes"),
    "collective-timeout-too-small": (lambda c: ([*T, *BASE, "--dist.timeout_s", "1", "--out", str(c.out("u5"))],
                                                c.out("u5")),
                                     r"dist\.timeout_s must be >= 5, got 1"),
    "cifar-missing-download-off": (lambda c: ([*T, *BASE, "--data", "cifar10", "--data.download", "false",
                                               "--data-dir", str(c.tmp / "nocifar"), "--out", str(c.out("d1"))],
                                              c.out("d1")),
                                   r"CIFAR-10 not found in '.*nocifar' and data\.download is false"),
    "imagefolder-missing-dir": (lambda c: ([*T, *BASE, "--data", "imagefolder", "--data-dir", str(c.tmp / "noif"),
                                            "--out", str(c.out("d2"))], c.out("d2")),
                                r"data directory not found: .*noif"),
    "imagefolder-empty": (lambda c: ([*T, *BASE, "--data", "imagefolder", "--data-dir", make_empty_imagefolder(c),
                                      "--out", str(c.out("d3"))], c.out("d3")),
                          r"empty or unreadable ImageFolder .*emptyif/train: Couldn't find any class folder"),
    "imagefolder-no-test-split": (lambda c: ([*T, *BASE, "--data", "imagefolder", "--data-dir",
                                              make_train_only_imagefolder(c), "--out", str(c.out("d4"))],
                                             c.out("d4")),
                                  r"ImageFolder data needs .*/train and .*/test; missing: .*trainonly/test"),
    "data-smaller-than-one-step": (lambda c: ([*T, *BASE, "--data.synthetic_size", "4", "--out", str(c.out("d5"))],
                                              c.out("d5")),
                                   r"4 training images cannot fill one step of micro_batch 8 x world size 1 = 8"),
    "val-split-takes-everything": (lambda c: ([*T, *BASE, "--data.val_size", "64", "--out", str(c.out("d6"))],
                                              c.out("d6")),
                                   r"data\.val_size=64 leaves no training images \(the training set has 64\)"),
    "resume-missing-dir": (lambda c: ([*T, *BASE, "--resume", str(c.tmp / "norun")], c.tmp / "norun"),
                           r"--resume: no such run directory: .*norun"),
    "resume-no-checkpoint": (lambda c: ([*T, *BASE, "--resume", empty_dir(c, "nockpt")], c.tmp / "nockpt"),
                             r"--resume: no complete checkpoint in .*nockpt/checkpoints"),
    "ckpt-truncated-weights": (lambda c: ([*T, *BASE, "--resume", str(p := c.ckpt_copy(
        "w", truncate("model.safetensors")))], p), r"--resume: checkpoint .*step_00000002 is corrupt or incomplete"),
    "ckpt-truncated-optimizer": (lambda c: ([*T, *BASE, "--resume", str(p := c.ckpt_copy(
        "o", truncate("optimizer.bin")))], p), r"--resume: checkpoint .*step_00000002 is corrupt or incomplete"),
    "ckpt-truncated-rng-state": (lambda c: ([*T, *BASE, "--resume", str(p := c.ckpt_copy(
        "r", truncate("random_states_0.pkl")))], p),
        r"is corrupt or incomplete \(ValueError: random_states_0\.pkl does not load with weights_only=True"),
    "ckpt-foreign-pickle": (lambda c: ([*T, *BASE, "--resume", str(p := c.ckpt_copy("f", foreign_pickle(c)))], p),
                            r"custom_checkpoint_0\.pkl does not load with weights_only=True: .*Unsupported global: "
                            r"GLOBAL io\.open"),
    "ckpt-garbage-trainer-state": (lambda c: ([*T, *BASE, "--resume", str(p := c.ckpt_copy(
        "t", lambda ck: (ck / "trainer_state.json").write_text("{")))], p),
        r"is corrupt or incomplete \(JSONDecodeError"),
    "out-inside-a-file": (lambda c: ([*T, *BASE, "--out", str(Path(c.file("afile", "x")) / "run")],
                                     c.tmp / "afile" / "run"),
                          r"output directory .*afile/run cannot be created: .*afile is a file, not a directory"),
    "out-is-a-file": (lambda c: ([*T, *BASE, "--out", c.file("bfile", "x")], c.tmp / "bfile"),
                      r"output directory .*bfile cannot be created: .*bfile is a file, not a directory"),
    "out-on-read-only-mount": (lambda c: ([*T, *BASE, "--out", str(c.ro_dir / "run")], c.ro_dir / "run"),
                               r"output directory is not writable: .*ro"),
    "study-no-points": (lambda c: (["-m", "cnnscale", "study", c.file("s0.yaml", "name: s0\nmodels: []\n"),
                                    "--out", str(c.out("st0"))], c.out("st0")),
                        r"s0\.yaml: models must be a non-empty list"),
    "study-no-world-sizes": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s1.yaml", "name: s1\nmodels: [lenet5]\nworld_sizes: []\n"), "--out", str(c.out("st1"))], c.out("st1")),
        r"s1\.yaml: world_sizes must be integers >= 1, got \[\]"),
    "study-global-batch-not-divisible": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s2.yaml", "name: s2\nscaling: strong\nglobal_batch: 100\nmodels: [lenet5]\nworld_sizes: [1, 3]\n"),
        "--out", str(c.out("st2"))], c.out("st2")),
        r"global_batch 100 is not divisible by world size 3"),
    "study-unknown-key": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s3.yaml", "name: s3\nmodels: [lenet5]\nworld_size: [1]\n"), "--out", str(c.out("st3"))], c.out("st3")),
        r"s3\.yaml: unknown key 'world_size' \(valid keys: "),
    "report-empty-dir": (lambda c: (["-m", "cnnscale", "report", d := empty_dir(c, "emptyruns")], Path(d)),
                         r"no runs found in .*emptyruns"),
    "report-foreign-dir": (lambda c: (["-m", "cnnscale", "report", d := foreign_dir(c)], Path(d)),
                           r"no runs found in .*foreign"),
    "report-missing-dir": (lambda c: (["-m", "cnnscale", "report", str(c.tmp / "noruns")], c.tmp / "noruns"),
                           r"no such run directory: .*noruns"),
    "unknown-command": (lambda c: (["-m", "cnnscale", "trian"], c.tmp / "none"),
                        r"unknown command 'trian' \(choose from: models, train"),
    # every command's flags go through the one parser: the same coercion and error style as the training flags
    "report-flag-not-a-number": (lambda c: (["-m", "cnnscale", "report", d := empty_dir(c, "wruns"), "--width",
                                             "lots"], Path(d)), r"--width: expected an integer, got 'lots'"),
    "study-unknown-backend": (lambda c: (["-m", "cnnscale", "study", c.file("s4.yaml", "name: s4\nmodels: [lenet5]\n"),
                                          "--backend", "nope", "--out", str(c.out("st4"))], c.out("st4")),
                              r"--backend: unknown value 'nope' \(choose from: local, slurm\)"),
    "study-wrong-type": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s5.yaml", "name: s5\nmodels: [lenet5]\nmax_steps: many\n"), "--out", str(c.out("st5"))], c.out("st5")),
        r"s5\.yaml: max_steps: expected an integer, got 'many'"),
    "models-unknown-flag": (lambda c: (["-m", "cnnscale", "models", "--famly", "vgg"], c.tmp / "none"),
                            r"unknown option --famly \(valid: --models, --family, --json, --backward\)"),
    "submit-flag-without-value": (lambda c: (["-m", "cnnscale", "submit", "--dry-run", "--nodes"], c.tmp / "none"),
                                  r"--nodes needs a value"),
}
# issue 19: ranges from one place, YAML that cannot hurt, the data decides what it can (a fixture of their own, so
# that each module fixture stays well inside pytest's per-test timeout on a 2-core machine)
CASES_19: dict[str, tuple[Callable[[Ctx], tuple[list[str], Path]], str]] = {
    "eta-min-negative": (lambda c: ([*T, *BASE, "--sched.eta_min", "-1", "--out", str(c.out("r1"))], c.out("r1")),
                         r"sched\.eta_min must be >= 0, got -1\.0"),
    "eta-min-above-lr": (lambda c: ([*T, *BASE, "--sched.eta_min", "0.5", "--out", str(c.out("r2"))], c.out("r2")),
                         r"sched\.eta_min must be <= optim\.lr \(0\.1\), got 0\.5"),
    "seed-negative": (lambda c: ([*T, *BASE, "--seed", "-1", "--out", str(c.out("r3"))], c.out("r3")),
                      r"train\.seed must be in \[0, 4294967296\), got -1"),
    "out-name-too-long": (lambda c: ([*T, *BASE, "--out", str(c.tmp / "longname" / ("r" * 300))], c.tmp / "longname"),
                          r"train\.out: path component 'r+'\.\.\.\(300 chars\) is 300 bytes long"),
    "width-mult-huge": (lambda c: ([*T, *BASE, "--model", "mobilenet_v2", "--model.width_mult", "1e9",
                                    "--out", str(c.out("r4"))], c.out("r4")),
                        r"model\.width_mult must be <= 16 \(a sanity limit"),
    "synthetic-size-huge": (lambda c: ([*T, *BASE, "--data.synthetic_size", "1000000000", "--out", str(c.out("r5"))],
                                       c.out("r5")), r"data\.synthetic_size must be <= 100000000 \(a sanity limit"),
    "synthetic-size-beyond-memory": (lambda c: ([*T, *BASE, "--data.synthetic_size", "100000000",
                                                "--out", str(c.out("r6"))], c.out("r6")),
                                     r"data\.synthetic_size 100000000 needs 344\.\d GiB of memory, but [\d.]+ GiB is "
                                     r"available on this machine"),
    "yaml-latin1-byte": (lambda c: ([*T, "--config", bytes_file(c, "l1.yaml", b"# caf\xe9\ntrain:\n  seed: 1\n"), *BASE,
                                     "--out", str(c.out("y6"))], c.out("y6")),
                         r"l1\.yaml: not UTF-8 text: byte 0xe9 at offset 5 \(line 1\); save the file as UTF-8"),
    "yaml-duplicate-key": (lambda c: ([*T, "--config", c.file("dup.yaml", "train:\n  seed: 1\n  seed: 2\n"), *BASE,
                                       "--out", str(c.out("y7"))], c.out("y7")),
                           r"dup\.yaml: YAML syntax error at line 3, column 3: duplicate key 'seed' "
                           r"\(first at line 2\)"),
    "yaml-alias-bomb": (lambda c: ([*T, "--config", c.file("bomb.yaml", ALIAS_BOMB), *BASE,
                                    "--out", str(c.out("y8"))], c.out("y8")),
                        r"bomb\.yaml: YAML syntax error at line \d+, column \d+: YAML aliases are not allowed "
                        r"\(\*a\): write the value out$"),
    "num-classes-not-the-data": (lambda c: ([*T, *BASE, "--model.num_classes", "100", "--out", str(c.out("c1"))],
                                            c.out("c1")),
                                 r"model\.num_classes is 100 but the synthetic data has 10 classes: .*larger_head"),
    "imagefolder-one-class": (lambda c: ([*T, *BASE, "--data", "imagefolder", "--data-dir",
                                          make_one_class_imagefolder(c), "--out", str(c.out("c2"))], c.out("c2")),
                              r"ImageFolder .*oneclass/train has 1 class folder \(cat\): a classifier needs at "
                              r"least 2"),
    "study-model-steps-not-a-number": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s6.yaml", "name: s6\nmodels: [{name: lenet5, max_steps: abc}]\n"), "--dry-run", "--out", str(c.out("st6"))],
        c.out("st6")), r"s6\.yaml: models\.max_steps: expected an integer, got 'abc'"),
    "study-model-steps-negative": (lambda c: (["-m", "cnnscale", "study", c.file(
        "s7.yaml", "name: s7\nmodels: [{name: lenet5, max_steps: -3}]\n"), "--dry-run", "--out", str(c.out("st7"))],
        c.out("st7")), r"s7\.yaml: model 'lenet5': max_steps must be >= 0, got -3"),
}
DEBUG_CASES = ["unknown-model", "yaml-syntax-error", "ckpt-truncated-weights"]
PLAIN = {*DEBUG_CASES, "imagefolder-empty", "synthetic-size-beyond-memory"}


def snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": (path.stat().st_size, path.stat().st_mtime_ns)}
    # .lock: the run directory's one-writer lock (issue 15.6), taken (and its holder written) by any attempt to run
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
            if p.name != ".lock"}


@dataclass
class Result:
    argv: list[str]
    proc: subprocess.CompletedProcess
    before: dict | None
    after: dict | None


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bad")
    ckpt_run = tmp / "ckpt-run"
    r = zygote.run([TRAIN, *BASE, "--out", str(ckpt_run)], cwd=tmp, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt_run / "checkpoints" / "step_00000002" / "random_states_0.pkl").is_file()
    ro = tmp / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    try:
        yield Ctx(tmp, ckpt_run, ro if mounted else None)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=False)


def _run(ctx: Ctx, kind: str, debug: bool = False) -> Result:
    argv, watched = {**CASES, **CASES_19}[kind][0](ctx)
    argv = [*argv, "--debug"] if debug else argv
    before = snapshot(watched)
    if debug or kind in PLAIN:
        proc = subprocess.run([PY, *argv], cwd=ctx.tmp, env=ENV, capture_output=True, text=True, timeout=300)
    else:
        proc = zygote.run(argv, cwd=ctx.tmp, env=ENV, timeout=300)
    return Result(argv, proc, before, snapshot(watched))


@pytest.fixture(scope="module")
def results(ctx: Ctx) -> dict[str, Result]:
    kinds = [k for k in CASES if k != "out-on-read-only-mount" or ctx.ro_dir is not None]
    jobs = [(k, False) for k in kinds] + [(k, True) for k in DEBUG_CASES]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {(k, d): pool.submit(_run, ctx, k, d) for k, d in jobs}
    return {f"{k}{' --debug' if d else ''}": f.result() for (k, d), f in futures.items()}


@pytest.fixture(scope="module")
def results_19(ctx: Ctx) -> dict[str, Result]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(_run, ctx, k) for k in CASES_19}
    return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_is_one_line_exit_2_no_traceback_no_partial_dir(kind: str, results: dict[str, Result],
                                                                   ctx: Ctx, skip_or_fail) -> None:
    if kind == "out-on-read-only-mount" and ctx.ro_dir is None:
        skip_or_fail("cannot mount a read-only tmpfs here (needs root; CI runs as root)")
    _check_one_line(kind, results[kind], CASES[kind][1], ctx)


def _check_one_line(kind: str, res: Result, pattern: str, ctx: Ctx) -> None:
    lines = [ln for ln in res.proc.stderr.splitlines() if ln.strip()]
    print(f"{kind}: {lines}")
    assert res.proc.returncode == 2, f"{res.argv}\n{res.proc.stderr[-3000:]}"
    assert len(lines) == 1, res.proc.stderr[-3000:]
    assert "Traceback" not in res.proc.stderr + res.proc.stdout
    assert re.match(r"(train\.py|cnnscale): error: ", lines[0]), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert res.after == res.before, f"{kind} left files behind: {res.before} -> {res.after}"
    assert not (ctx.tmp / "PWNED").exists(), "a checkpoint pickle ran code"


@pytest.mark.parametrize("kind", list(CASES_19))
def test_issue_19_input_is_one_short_line_exit_2_no_traceback_no_partial_dir(kind: str, results_19: dict[str, Result],
                                                                             ctx: Ctx) -> None:
    """The same checks; and the values a message quotes are cut (~200 characters), so the line stays short."""
    _check_one_line(kind, results_19[kind], CASES_19[kind][1], ctx)
    line = results_19[kind].proc.stderr.strip()
    assert len(line) < 400, line[:1000]


@pytest.mark.parametrize("kind", DEBUG_CASES)
def test_debug_shows_the_traceback(kind: str, results: dict[str, Result]) -> None:
    res = results[f"{kind} --debug"]
    assert res.proc.returncode == 2
    assert "Traceback (most recent call last)" in res.proc.stderr
    assert re.search(CASES[kind][1], res.proc.stderr.strip().splitlines()[-1])


def test_world_size_larger_than_the_data_two_processes(tmp_path: Path) -> None:
    """Through torchrun each rank prints the one-line error and exits 2; the elastic agent then reports the exit
    codes (its own traceback is launcher noise, not ours). No run directory is made."""
    out = tmp_path / "out"
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:29970", TRAIN, *BASE, "--data.synthetic_size", "8", "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    ours = re.findall(r"train\.py: error: (.*)", r.stderr)
    assert r.returncode != 0
    assert len(ours) == 2, r.stderr[-3000:]  # one line from each rank
    assert all(ln.startswith("8 training images cannot fill one step of micro_batch 8 x world size 2 = 16; use fewer")
               and "train.py" not in ln for ln in ours), ours
    assert re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]
    assert "cnnscale/" not in r.stderr  # no traceback through our code
    assert not out.exists()


def test_malicious_checkpoint_pickle_would_run_code_without_the_check(tmp_path: Path) -> None:
    """The payload is real: plain unpickling (what Accelerate's weights_only=False load of custom_checkpoint_*.pkl
    does) runs it, and weights_only=True refuses it."""
    f, marker = tmp_path / "custom_checkpoint_0.pkl", tmp_path / "marker"
    torch.save({"x": _Payload(str(marker))}, f)  # the format Accelerate writes
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL io.open"):
        torch.load(f, weights_only=True)
    assert not marker.exists()
    torch.load(f, weights_only=False)
    assert marker.exists()
