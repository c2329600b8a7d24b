"""The run config and the one parser, in process: precedence (defaults < YAML < overrides < flags), every field's
validation (the fields are enumerated from the dataclasses and each one's values below and above its range are
derived from the Range declared beside it, so none can be forgotten), unknown keys and sections, ``--help`` listing
every flag with its help and default, and study specs' validation. Subprocesses check ``cnnscale train --help`` and
a few out-of-range flags as real CLI calls (exit 2, one line, no traceback, no run directory).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from cnnscale.config import (
    SECTIONS,
    SHORT_FLAGS,
    CommandParser,
    Config,
    ModelConfig,
    coerce,
    field_docs,
    field_types,
    load_config,
    show_default,
)
from cnnscale.config.ranges import RANGE, Range, field_range
from cnnscale.errors import UserError
from cnnscale.study.spec import MODEL_KEYS, SPEC_KEYS, ModelSpec, StudySpec, parse_spec

REPO = Path(__file__).resolve().parents[1]
ALL_FIELDS = [f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]

# hand-picked regressions: section.field -> (a value its range/choice check refuses, the nearest value it accepts);
# every field is also tried below and above the Range declared beside it (test_each_field_refuses_values_outside...)
INVALID: dict[str, tuple[Any, Any]] = {
    "model.width_mult": (0, 0.25), "model.num_classes": (1, 2),
    "data.name": ("mnist", "synthetic"), "data.val_size": (-1, 0), "data.loader": ("gpu", "device"),
    "data.num_workers": (-1, 0), "data.synthetic_size": (0, 1), "data.limit_train": (-1, 0),
    "data.limit_test": (-1, 0),
    "optim.name": ("lamb", "rmsprop"), "optim.lr": (0, 1e-9), "optim.momentum": (1.0, 0.0),
    "optim.weight_decay": (-1e-4, 0.0), "optim.eps": (0, 1e-12),
    "sched.name": ("poly", "onecycle"), "sched.warmup_epochs": (-1, 0), "sched.warmup_start_factor": (0, 1.0),
    "sched.step_size": (0, 0.5), "sched.gamma": (1.5, 1.0), "sched.t_max_epochs": (-1, 0), "sched.patience": (-1, 0),
    "train.epochs": (-1, 0), "train.max_steps": (-1, 0), "train.micro_batch": (0, 1), "train.grad_accum": (0, 1),
    "train.mixed_precision": ("fp8", "bf16"), "train.clip_grad": (-1, 0), "train.label_smoothing": (1.0, 0.0),
    "train.log_every": (0, 1), "train.ckpt_every": (-1, 0), "train.keep_ckpts": (0, 1),
    "train.progress": ("fancy", "none"),
    "profile.warmup_steps": (-1, 0), "profile.nvml_hz": (0, 0.5), "profile.sync_probe_every": (-1, 0),
    "profile.trace_steps": (-1, 0), "profile.peak_tflops": (-1, 0),
    "fast.compile_mode": ("fast", "max-autotune-no-cudagraphs"),
    "dist.timeout_s": (4, 5), "dist.bucket_mb": (0, 1), "dist.comm_hook": ("int8", "bf16"),
    "dist.preempt_check_every": (0, 1),
}
# a value of the wrong type for each kind of annotation, through YAML
WRONG_TYPE = {"int": "lots", "float": "fast", "bool": "maybe", "str": [1, 2], "tuple[float, ...]": ["a"],
              "float | None": "wide", "tuple[str, ...]": [[1]], "int | None": "lots", "bool | None": "maybe"}


def _split(dest: str) -> tuple[str, str]:
    sec, _, fld = dest.partition(".")
    return sec, fld


def _yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------------------------------------- completeness
def _range(dest: str) -> Range:
    sec, fld = _split(dest)
    return field_range(SECTIONS[sec], fld)


def test_every_field_declares_its_range_or_says_why_it_has_none() -> None:
    for dest in ALL_FIELDS:
        rng = _range(dest)
        assert isinstance(rng, Range), f"{dest}: declare it with setting(...) (cnnscale.config.ranges)"
        sec, fld = _split(dest)
        constrained = (rng.choices is not None or rng.path or rng.cap is not None
                       or any(b is not None for b in (rng.ge, rng.gt, rng.le, rng.lt)))
        assert constrained or rng.free or field_types(SECTIONS[sec])[fld] is bool, f"{dest}: no range and no reason"
    assert set(INVALID) <= set(ALL_FIELDS)
    assert list(SECTIONS) == [f.name for f in dataclasses.fields(Config)]


def _type_key(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def test_every_field_has_a_docstring_and_a_known_type() -> None:
    for sec, cls in SECTIONS.items():
        docs = field_docs(cls)
        for name, tp in field_types(cls).items():
            assert docs.get(name), f"{sec}.{name} has no docstring"
            assert _type_key(tp) in WRONG_TYPE, (sec, name, tp)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("dest", sorted(INVALID))
def test_each_range_and_choice_is_checked_from_flags_and_yaml(dest: str, tmp_path: Path) -> None:
    bad, edge = INVALID[dest]
    sec, fld = _split(dest)
    with pytest.raises(UserError, match=rf"^{re.escape(dest)}(:| must)"):
        load_config([f"--{dest}", str(bad)])
    with pytest.raises(UserError, match=rf"^{re.escape(dest)}(:| must)"):
        load_config(path=_yaml(tmp_path, f"{sec}:\n  {fld}: {bad!r}\n"))
    cfg = load_config(["--max-steps", "5", f"--{dest}", str(edge)])  # bounded by steps: epochs 0 stays 0
    assert getattr(getattr(cfg, sec), fld) == edge
    choices = field_range(SECTIONS[sec], fld).choices
    for choice in choices or ():
        value = getattr(getattr(load_config([f"--{dest}", choice]), sec), fld)
        assert value == choice or value == (choice,)


def _item_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether the field is a tuple of them) of a field annotation."""
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return (args[0] if args else tp), False


def _outside(rng: Range, tp: Any) -> list[Any]:
    """Values just below and just above ``rng``, derived from the Range alone: each must be refused."""
    inner, many = _item_type(tp)
    step = 1 if inner is int else 1e-6
    out: list[Any] = ["not-a-choice"] if rng.choices is not None else []
    out += [rng.ge - step] if rng.ge is not None else []
    out += [rng.gt] if rng.gt is not None else []
    out += [rng.le + step] if rng.le is not None else []
    out += [rng.lt] if rng.lt is not None else []
    out += [rng.cap + 1 if inner is int else rng.cap * 2] if rng.cap is not None else []
    out += [float("inf")] if inner is float else []
    out += ["x" * 300, "a/" + "y" * 256] if rng.path else []
    out += ["z" * (rng.max_len + 1)] if inner is str and rng.choices is None and not rng.path else []
    out = [inner(v) if inner in (int, float) else v for v in out]
    return [[v] for v in out] + ([[]] if rng.nonempty else []) if many else out


def _inside(rng: Range, tp: Any) -> list[Any]:
    """The edges of ``rng`` that it accepts (its bounds, or just inside an open bound)."""
    inner, many = _item_type(tp)
    if inner not in (int, float):
        return []
    step = 1 if inner is int else 1e-6
    edges = [rng.ge, None if rng.gt is None else rng.gt + step, rng.le, None if rng.lt is None else rng.lt - step,
             rng.cap]
    return [[inner(v)] if many else inner(v) for v in edges if v is not None]


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_as_text(v) for v in value) + "]"
    return str(value)


OUTSIDE = [(dest, v) for dest in ALL_FIELDS for v in _outside(_range(dest), field_types(SECTIONS[_split(dest)[0]])[
    _split(dest)[1]])]


def test_every_constrained_field_has_values_outside_its_range() -> None:
    tried = {dest for dest, _ in OUTSIDE}
    for dest in ALL_FIELDS:
        sec, fld = _split(dest)
        if field_types(SECTIONS[sec])[fld] is not bool and not _range(dest).free:
            assert dest in tried, f"{dest}: its Range gives no value to refuse"


@pytest.mark.parametrize(("dest", "bad"), OUTSIDE, ids=[f"{d}={str(v)[:20]}" for d, v in OUTSIDE])
def test_each_field_refuses_values_outside_its_declared_range(dest: str, bad: Any, tmp_path: Path) -> None:
    sec, fld = _split(dest)
    pattern = rf"^{re.escape(dest)}(:| must | is )"
    with pytest.raises(UserError, match=pattern) as flag_error:
        load_config(["--max-steps", "5", f"--{dest}", _as_text(bad)])
    with pytest.raises(UserError, match=pattern):
        load_config(path=_yaml(tmp_path, f"{sec}:\n  {fld}: {_as_text(bad)}\n"))
    with pytest.raises(UserError, match=pattern):
        load_config(overrides={sec: {fld: bad}})
    assert "\n" not in str(flag_error.value) and len(str(flag_error.value)) < 600


@pytest.mark.parametrize("dest", ALL_FIELDS)
def test_each_field_accepts_the_edges_of_its_declared_range(dest: str) -> None:
    sec, fld = _split(dest)
    for edge in _inside(_range(dest), field_types(SECTIONS[sec])[fld]):
        cfg = load_config(["--max-steps", "5", f"--{dest}", _as_text(edge)])
        got = getattr(getattr(cfg, sec), fld)
        assert got == (tuple(edge) if isinstance(edge, list) else edge), (dest, edge, got)


CLI_CASES = ["sched.eta_min", "train.seed", "train.out", "optim.momentum"]


def test_out_of_range_values_as_real_cli_calls(tmp_path: Path) -> None:
    """A real ``launch/train.py`` per field, with the first value its Range refuses: exit 2, one line on stderr,
    no traceback, no run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("CNNSCALE_DEBUG", None)
    procs = {}
    for i, dest in enumerate(CLI_CASES):
        bad = _outside(_range(dest), field_types(SECTIONS[_split(dest)[0]])[_split(dest)[1]])[0]
        out = tmp_path / f"run{i}"
        argv = [sys.executable, str(REPO / "launch" / "train.py"), "--model", "lenet5", "--data", "synthetic",
                "--max-steps", "1", f"--{dest}", _as_text(bad)] + ([] if dest == "train.out" else ["--out", str(out)])
        procs[dest] = (subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out)
    for dest, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (dest, stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in stdout + stderr, (dest, stderr[-2000:])
        assert re.match(rf"train\.py: error: {re.escape(dest)}(:| must )", lines[0]), lines[0]
        assert not out.exists() and not (tmp_path / "runs").exists()


def test_eta_min_is_at_most_lr_a_cross_section_rule_checked_once_on_the_final_values(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^sched\.eta_min must be <= optim\.lr \(0\.1\), got 0\.5"):
        load_config(["--sched.eta_min", "0.5"])
    with pytest.raises(UserError, match=r"^sched\.eta_min must be <= optim\.lr \(0\.01\), got 0\.05"):
        load_config(["--lr", "0.01", "--sched.eta_min", "0.05"])
    path = _yaml(tmp_path, "optim:\n  lr: 0.01\nsched:\n  eta_min: 0.05\n")  # fixed by a later source: fine
    assert load_config(["--config", path, "--lr", "0.1"]).sched.eta_min == 0.05
    assert load_config(["--sched.eta_min", "0.1"]).sched.eta_min == 0.1  # the edge: eta_min == lr


def test_seed_and_path_limits_name_the_problem() -> None:
    for argv, message in [
        (["--seed", "-1"], r"^train\.seed must be in \[0, 4294967296\), got -1$"),
        (["--seed", str(2**32)], r"^train\.seed must be in \[0, 4294967296\), got 4294967296$"),
        (["--out", "r" * 300], r"^train\.out: path component 'r{60}'\.\.\.\(300 chars\) is 300 bytes long \(a "
                               r"file name is at most 255\)$"),
        (["--data-dir", "a\x00b"], r"^data\.data_dir: a path cannot contain a NUL byte"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config(argv)


def test_command_flags_use_the_same_ranges() -> None:
    p = CommandParser("cnnscale toy")
    p.add_argument("--steps", type=int, ge=1, cap=1000)
    p.add_argument("--frac", type=float, ge=0, lt=1)
    assert p.parse_args(["--steps", "1000", "--frac", "0"]).steps == 1000
    for argv, message in [(["--steps", "0"], r"^--steps must be >= 1, got 0$"),
                          (["--steps", "1001"], r"^--steps must be <= 1000 \(a sanity limit"),
                          (["--frac", "1"], r"^--frac must be in \[0, 1\), got 1\.0$"),
                          (["--frac", "nan"], r"^--frac must be a finite number, got nan$")]:
        with pytest.raises(UserError, match=message):
            p.parse_args(argv)
    with pytest.raises(TypeError):
        p.add_argument("--name", ge=1)  # bounds on a text flag are a programming error


def test_study_keys_declare_their_ranges_too() -> None:
    for cls, keys in ((StudySpec, SPEC_KEYS), (ModelSpec, MODEL_KEYS)):
        for key in keys:
            assert field_range(cls, key) is not None, f"{cls.__name__}.{key}: declare it with setting(...)"
    assert all(RANGE in f.metadata for f in dataclasses.fields(ModelConfig))


@pytest.mark.parametrize("dest", ALL_FIELDS)
def test_each_field_refuses_a_wrong_type(dest: str, tmp_path: Path) -> None:
    sec, fld = _split(dest)
    tp = field_types(SECTIONS[sec])[fld]
    bad = WRONG_TYPE[_type_key(tp)]
    with pytest.raises(UserError, match=rf"^{re.escape(dest)}: expected "):
        load_config(overrides={sec: {fld: bad}})
    if not isinstance(bad, list):  # the same text as a flag (a str field takes any text)
        with pytest.raises(UserError, match=rf"^{re.escape(dest)}: expected "):
            load_config([f"--{dest}", bad])


def test_coerce_reads_yaml_quirks_and_cli_text() -> None:
    assert coerce("k", False, str) == "no"  # YAML 1.1: a bare `no` is false
    assert coerce("k", "1e-4", float) == 1e-4  # YAML 1.1: 1e-4 without a dot is a string
    assert coerce("k", "no", str, text=True) == "no"
    assert coerce("k", "007", str, text=True) == "007"
    assert coerce("k", "8", int, text=True) == 8 and coerce("k", 8.0, int) == 8
    assert coerce("k", "[30, 60]", tuple[float, ...], text=True) == (30.0, 60.0)
    assert coerce("k", 30, tuple[float, ...]) == (30.0,)
    assert coerce("k", "null", float | None, text=True) is None
    with pytest.raises(UserError, match="k: expected an integer, got 8.5"):
        coerce("k", 8.5, int)
    with pytest.raises(UserError, match="k: expected true/false, got 1"):
        coerce("k", 1, bool)


# ---------------------------------------------------------------------------------------------- precedence
def test_precedence_defaults_then_yaml_then_overrides_then_flags(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "optim:\n  lr: 0.5\n  momentum: 0.8\ntrain:\n  micro_batch: 16\n  mixed_precision: no\n"
                           "sched:\n  milestones: [30, 60]\n  warmup_epochs: 1e-1\n")
    cfg = load_config(["--config", path, "--lr", "0.01"], overrides={"train": {"micro_batch": 32}})
    assert cfg.optim.lr == 0.01  # flag over YAML
    assert cfg.optim.momentum == 0.8  # YAML over default
    assert cfg.train.micro_batch == 32  # overrides over YAML
    assert cfg.train.mixed_precision == "no" and cfg.sched.milestones == (30.0, 60.0)
    assert cfg.sched.warmup_epochs == 0.1
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched: the default
    assert load_config(["--train.micro_batch", "8"], overrides={"train": {"micro_batch": 32}}).train.micro_batch == 8
    assert load_config(path=path).optim.lr == 0.5  # path= works like --config
    assert load_config(["--lr", "0.2", "--optim.lr", "0.3"]).optim.lr == 0.3  # the last flag wins
    assert load_config(["--optim.lr", "0.3", "--lr", "0.2"]).optim.lr == 0.2


def test_defaults_are_the_dataclass_defaults_and_one_epoch_when_unbounded() -> None:
    cfg = load_config([])
    assert cfg == dataclasses.replace(Config(), train=dataclasses.replace(Config().train, epochs=1))
    assert load_config(["--max-steps", "5"]).train.epochs == 0


def test_command_line_forms() -> None:
    cfg = load_config(["--model=lenet5", "--lr", "1e-4", "--mixed-precision", "no", "--data.data-dir", "d",
                       "--fast.compile", "--out", "runs/x", "--resume", "--sched.milestones", "[1, 2]"])
    assert (cfg.model.name, cfg.optim.lr, cfg.train.mixed_precision, cfg.data.data_dir) == ("lenet5", 1e-4, "no", "d")
    assert cfg.fast.compile is True  # a bare bool flag means true
    assert cfg.train.resume == "runs/x"  # --resume alone resumes --out
    assert load_config(["--resume", "runs/y"]).train.resume == "runs/y"
    assert load_config(["--data.download", "false"]).data.download is False
    with pytest.raises(UserError, match="optim.lr must be > 0, got -0.0001"):  # a value may start with one dash
        load_config(["--lr", "-1e-4"])
    with pytest.raises(UserError, match="--resume without a directory resumes --out"):
        load_config(["--resume"])


# ---------------------------------------------------------------------------------------------- unknown input
@pytest.mark.parametrize(("argv", "message"), [
    (["--optimizer.lr", "1"], r"^command line: unknown section 'optimizer' \(choose from: model, data, optim, sched"),
    (["--train.lrr", "1"], r"^command line: unknown key 'train\.lrr' \(valid keys: epochs, max_steps"),
    (["--bogus", "1"], r"^unknown option --bogus \(valid: --model, --data, --data-dir, .*--config, --section\.field\)"),
    (["--mod", "lenet5"], r"^unknown option --mod "),  # never abbreviated
    (["lenet5"], r"^unexpected argument 'lenet5' \(options are --flag value or --section\.field value\)"),
    (["--lr"], r"^--lr needs a value$"),
    (["--mixed-precision", "fp8"], r"^train\.mixed_precision: unknown value 'fp8' \(choose from: no, fp16, bf16\)"),
])
def test_unknown_and_malformed_flags(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(argv)


@pytest.mark.parametrize(("text", "message"), [
    ("optimizer:\n  lr: 1\n", r"cfg\.yaml: unknown section 'optimizer' \(choose from: model, data"),
    ("train:\n  lrr: 1\n", r"cfg\.yaml: unknown key 'train\.lrr' \(valid keys: epochs, max_steps"),
    ("train: 3\n", r"cfg\.yaml: section 'train' must be a mapping, got int"),
    ("- a\n", r"cfg\.yaml: expected a mapping of sections, got list"),
    ("train:\n  lr: [1\n", r"cfg\.yaml: YAML syntax error at line \d+, column \d+"),
])
def test_unknown_and_malformed_yaml(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        load_config(["--config", _yaml(tmp_path, text)])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------------------------------------- help
def _help_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside words such as max-autotune-no-cudagraphs
    with pytest.raises(SystemExit) as exc:
        load_config(argv)
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _field_help(dest: str) -> str:
    sec, fld = _split(dest)
    cls = SECTIONS[sec]
    f = next(x for x in dataclasses.fields(cls) if x.name == fld)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    doc = " ".join(field_docs(cls)[fld].split())
    return doc if "default" in doc else f"{doc} (default: {show_default(default)})"


def test_help_lists_every_field_and_short_flag_with_help_and_default(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = _help_text(capsys, monkeypatch, ["--model", "lenet5", "--help"])
    for dest in ALL_FIELDS:
        assert f"--{dest} " in out and _field_help(dest) in out, dest
    for flag, dest in SHORT_FLAGS.items():
        assert re.search(rf"{re.escape(flag)} \S+ = --{re.escape(dest)}\b.*?{re.escape(_field_help(dest))}", out), flag
    assert "--train.mixed_precision {no,fp16,bf16}" in out
    assert "--optim.lr FLOAT Peak learning rate. (default: 0.1)" in out
    assert "--config FILE.yaml" in out


def test_cnnscale_train_help_subprocess() -> None:
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cnnscale", "train", "--help"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join(proc.stdout.split())
    assert out.startswith("usage: cnnscale train ")
    assert all(f"--{dest} " in out and _field_help(dest) in out for dest in ALL_FIELDS)
    assert all(f"{flag} " in out for flag in SHORT_FLAGS)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``cnnscale study SPEC --dry-run | head -1``: the reader leaves early; no BrokenPipeError traceback, exit
    141 (128 + SIGPIPE) as a shell tool would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    spec = tmp_path / "big.yaml"  # about 400 points: more output than a pipe holds, so the writer must meet the close
    spec.write_text("name: big\nmodels: [lenet5, resnet18, vgg16, mobilenet_v2]\nworld_sizes: "
                    f"{list(range(1, 101))}\n")
    proc = subprocess.Popen([sys.executable, "-m", "cnnscale", "study", str(spec), "--dry-run", "--out",
                             str(tmp_path / "qs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path)
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert first.startswith(b"todo ") and err == ""


# ---------------------------------------------------------------------------------------------- the parser
@dataclasses.dataclass(frozen=True)
class _Toy:
    """toy: a section of another command."""

    temperature: float = 4.0
    """Softmax temperature."""
    hard: bool = False
    """Use hard labels."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"toy.temperature must be > 0, got {self.temperature}")


def _toy_parser() -> CommandParser:
    p = CommandParser("cnnscale toy", description="a toy command")
    p.add_argument("--steps", type=int, default=20, help="steps")
    p.add_argument("--scale", type=float, default=1.0, help="scale")
    p.add_argument("--mode", default="a", choices=("a", "b"), help="mode")
    p.add_section("toy", _Toy, aliases={"--temperature": "temperature"})
    return p


def test_command_parser_one_error_style() -> None:
    p = _toy_parser()
    for argv, message in [
        (["--steps", "x"], r"^--steps: expected an integer, got 'x'$"),
        (["--scale", "fast"], r"^--scale: expected a number, got 'fast'$"),
        (["--mode", "c"], r"^--mode: unknown value 'c' \(choose from: a, b\)$"),
        (["--step", "3"], r"^unknown option --step \(valid: --steps, --scale, --mode, --temperature, --section\.field"),
        (["--toy.cold"], r"^command line: unknown key 'toy\.cold' \(valid keys: temperature, hard\)$"),
        (["--steps"], r"^--steps needs a value$"),
        (["--temperature", "hot"], r"^toy\.temperature: expected a number, got 'hot'$"),
    ]:
        with pytest.raises(UserError, match=message):
            p.parse_args(argv)
    with pytest.raises(UserError, match=r"^toy\.temperature must be > 0, got -1\.0$"):
        p.section(p.parse_args(["--temperature", "-1"]), "toy")


def test_command_parser_reads_sections_and_leaves_the_rest() -> None:
    p = _toy_parser()
    ns, rest = p.parse_known_args(["--temperature=2", "--toy.hard", "--steps", "-3", "--lr", "0.1", "--", "--x"])
    assert (ns.steps, ns.scale, ns.mode) == (-3, 1.0, "a")
    assert p.section(ns, "toy") == _Toy(temperature=2.0, hard=True)
    assert rest == ["--lr", "0.1", "--", "--x"]
    assert p.section(p.parse_args([]), "toy") == _Toy()


def test_command_parser_help_shows_defaults(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        _toy_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS steps (default: 20)" in out and "--mode {a,b} mode (default: a)" in out
    assert "--toy.temperature FLOAT Softmax temperature. (default: 4.0)" in out
    assert "--toy.hard [BOOL] Use hard labels. (default: false)" in out


# ---------------------------------------------------------------------------------------------- study specs
BASE_SPEC = {"name": "t", "models": ["lenet5"]}
# study key -> a value its check refuses (None: the key has no constraint beyond its type)
SPEC_INVALID: dict[str, Any] = {
    "name": None, "description": None, "models": [], "scaling": "sideways", "world_sizes": [0],
    "precisions": ["fp8"], "micro_batches": [0], "global_batch": -1, "grad_accum": 0, "max_micro_batch": -1,
    "min_micro_batch": 0, "max_steps": 0, "data": "mnist", "timeout_s": 0, "threads_per_process": -1,
    "launcher": "mpirun", "overrides": {"lr": 1}, "settings": {"bad name": {}}, "max_batch": {"start": 0},
    "allreduce_bench": None, "gpus_per_node": -1, "repeats": 0, "repeats_at": {1: 0},
    "networks": ["fast"], "network": "1 gbit",
}


def test_every_study_key_is_checked_or_listed() -> None:
    assert set(SPEC_INVALID) == set(SPEC_KEYS)


@pytest.mark.parametrize("key", sorted(k for k, v in SPEC_INVALID.items() if v is not None))
def test_each_study_key_is_validated_naming_the_file(key: str) -> None:
    with pytest.raises(UserError, match=rf"^s\.yaml: .*{re.escape(key)}"):
        parse_spec({**BASE_SPEC, key: SPEC_INVALID[key]}, "s.yaml")


def test_study_values_go_through_the_one_coercion() -> None:
    spec = parse_spec({**BASE_SPEC, "precisions": [False, "bf16"], "world_sizes": 2, "timeout_s": 60,
                       "models": ["lenet5", {"name": "resnet18", "micro_batches": [8], "max_steps": 3}]}, "s.yaml")
    assert spec.precisions == ("no", "bf16") and spec.world_sizes == (2,) and spec.timeout_s == 60.0
    assert spec.models[1].micro_batches == (8,) and spec.models[1].max_steps == 3
    with pytest.raises(UserError, match=r"^s\.yaml: world_sizes: expected an integer, got 'two'"):
        parse_spec({**BASE_SPEC, "world_sizes": ["two"]}, "s.yaml")
    with pytest.raises(UserError, match=r"^s\.yaml: allreduce_bench: expected true/false"):
        parse_spec({**BASE_SPEC, "allreduce_bench": "maybe"}, "s.yaml")
    with pytest.raises(UserError, match=r"^s\.yaml: unknown key 'models\.batch' \(valid keys: name, micro_batches"):
        parse_spec({**BASE_SPEC, "models": [{"name": "lenet5", "batch": 3}]}, "s.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_study_model_entries_are_checked_like_the_study() -> None:
    with pytest.raises(UserError, match=r"^s\.yaml: model 'lenet5': max_steps must be >= 0, got -3$"):
        parse_spec({**BASE_SPEC, "models": [{"name": "lenet5", "max_steps": -3}]}, "s.yaml")
    with pytest.raises(UserError, match=r"^s\.yaml: models\.max_steps: expected an integer, got 'abc'$"):
        parse_spec({**BASE_SPEC, "models": [{"name": "lenet5", "max_steps": "abc"}]}, "s.yaml")
    with pytest.raises(UserError, match=r"^s\.yaml: model '': name must not be empty$"):
        parse_spec({**BASE_SPEC, "models": [{"name": ""}]}, "s.yaml")
    with pytest.raises(UserError, match=r"^s\.yaml: world_sizes must be integers <= 65536 \(a sanity limit\)"):
        parse_spec({**BASE_SPEC, "world_sizes": [1, 10**9]}, "s.yaml")


# ---------------------------------------------------------------------------------------------- YAML that cannot hurt
def _yaml_bytes(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_bytes(data)
    return str(p)


def test_yaml_is_utf8_a_bom_is_fine_anything_else_names_the_byte(tmp_path: Path) -> None:
    assert load_config(path=_yaml_bytes(tmp_path, b"\xef\xbb\xbftrain:\n  seed: 3  # caf\xc3\xa9\n")).train.seed == 3
    with pytest.raises(UserError, match=r"cfg\.yaml: not UTF-8 text: byte 0xe9 at offset 22 \(line 2\); save the "
                                        r"file as UTF-8$"):
        load_config(path=_yaml_bytes(tmp_path, b"train:\n  seed: 3 # caf\xe9\n"))
    with pytest.raises(UserError, match=r"cfg\.yaml: not UTF-8 text: byte 0xff at offset 0 \(line 1\)"):
        load_config(path=_yaml_bytes(tmp_path, "train: {}\n".encode("utf-16")))


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  seed: 1\n  seed: 2\n", r"line 3, column 3: duplicate key 'seed' \(first at line 2\)$"),
    ("train: {}\ntrain: {}\n", r"line 2, column 1: duplicate key 'train' \(first at line 1\)$"),
    ("a: &x [1]\nsched:\n  milestones: *x\n", r"line 3, column 15: YAML aliases are not allowed \(\*x\)"),
    ("train:\n  seed: " + "[" * 100 + "]" * 100 + "\n", r"nested deeper than 64 levels"),
    ("train:\n  seed: " + "9" * 5000 + "\n", r"cfg\.yaml: unreadable YAML value: Exceeds the limit"),
    ("train:\n  seed: 1\n\x00\n", r"cfg\.yaml: YAML syntax error: unacceptable character #x0000"),
])
def test_yaml_refuses_duplicates_aliases_depth_and_monsters(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message) as exc:
        load_config(path=_yaml(tmp_path, text))
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cfg\.yaml: larger than 1048576 bytes"):
        load_config(path=_yaml(tmp_path, "# " + "x" * (1 << 20) + "\n"))


def test_quoted_values_are_cut_to_about_200_characters(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^train\.micro_batch: expected an integer, got 'l{200}'\.\.\.\(5000 chars\)$"):
        load_config(["--micro-batch", "l" * 5000])
    with pytest.raises(UserError) as exc:
        load_config(overrides={"sched": {"milestones": [[list(range(1000))] * 1000]}})
    assert len(str(exc.value)) < 300, str(exc.value)[:500]
    with pytest.raises(UserError, match=r"unknown key 'train\.k{194}'\.\.\.\(906 chars\) \(valid keys"):
        load_config(path=_yaml(tmp_path, "train:\n  " + "k" * 900 + ": 1\n"))
