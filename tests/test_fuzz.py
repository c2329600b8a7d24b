"""Fuzzing the config parser and the study-spec loader (hypothesis): random flag names, values, types and YAML
documents. The property: never a traceback. Each input gives either a valid config (or spec) or one
:class:`~cnnscale.errors.UserError` of one short line.

Budget: a fixed number of examples per property (``derandomize=True``: the same inputs on every run, so CI is
deterministic; hypothesis prints the falsifying example and its ``@reproduce_failure`` blob on a failure), under
~20 s in all on a 2-core machine. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnscale.config import SECTIONS, SHORT_FLAGS, Config, load_config
from cnnscale.config.yamlfile import load_yaml_text
from cnnscale.errors import UserError
from cnnscale.study.spec import MODEL_KEYS, SPEC_KEYS, StudySpec, load_spec, parse_spec

FIELDS = [f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
BUDGET = settings(max_examples=100, deadline=None, derandomize=True, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values a user (or a hostile file) might type: YAML oddities, edges, huge and strange numbers, paths
TRICKY = ["", "0", "-0", "-1", "1e-4", "1e400", "-1e400", ".inf", "-.inf", ".nan", "nan", "inf", "0x1F", "0o17",
          "1_000", "9" * 5000, "true", "no", "yes", "null", "~", "[]", "{}", "[1, 2]", "[[1]]", "{a: 1}", "&a [*a]",
          "*a", "!!binary AA==", "!!python/object:os.system ls", "- a", "a: b", "'quoted'", '"x', "[", "{", "\x00",
          "\t", "é", "\ufeff", "2001-12-14", "12:30:00", "?", "|", ">", "%YAML 1.1", "---", "...", "r" * 300,
          "a/" * 2100, "../..", "/", "-", "--", "=", "4294967296", "4294967295", "65537", "100000001"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30), st.sampled_from(TRICKY))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
FLAG_NAMES = st.one_of(st.sampled_from([f"--{f}" for f in FIELDS] + list(SHORT_FLAGS) + ["--config"]),
                       st.builds(lambda s, f: f"--{s}.{f}", st.sampled_from(list(SECTIONS)), st.text(max_size=10)),
                       st.text(max_size=12).filter(lambda t: t not in ("-h", "--help")))
FLAG_VALUES = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40),
                        st.integers().map(str), st.floats().map(repr))


def _one_line(exc: UserError) -> None:
    text = str(exc)
    assert "\n" not in text, text[:500]
    assert len(text) < 3000, f"{len(text)} characters: {text[:300]}..."


def _config_or_user_error(**kwargs: Any) -> Config | None:
    try:
        return load_config(**kwargs)
    except UserError as exc:
        _one_line(exc)
        return None
    except SystemExit as exc:  # --help (a flag name argparse reads as -h) prints help and exits 0
        assert exc.code == 0, exc
        return None


@BUDGET
@given(st.lists(st.tuples(FLAG_NAMES, st.one_of(st.none(), FLAG_VALUES)), max_size=6))
def test_random_flags_never_give_a_traceback(flags: list[tuple[str, str | None]]) -> None:
    argv = [x for name, value in flags for x in ([name] if value is None else [name, value])]
    argv = [a for a in argv if a not in ("-h", "--help")]
    cfg = _config_or_user_error(argv=argv)
    assert cfg is None or isinstance(cfg, Config)


def _yaml_doc(sections: dict[str, Any]) -> str:
    try:
        return yaml.safe_dump(sections, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return str(sections)


DOCS = st.one_of(
    st.dictionaries(st.sampled_from(list(SECTIONS)), st.dictionaries(
        st.sampled_from(sorted({f.split(".", 1)[1] for f in FIELDS})), VALUES, max_size=4), max_size=3).map(_yaml_doc),
    VALUES.map(_yaml_doc),
    st.text(max_size=200),
    st.lists(st.sampled_from(TRICKY + ["train:", "  seed: 1", "  seed: 2", "optim: {lr: *x}", "a: &x [1]",
                                       "sched:", "  milestones: [1, 2]", "  - 3", "\t", "#"]), max_size=8)
    .map("\n".join),
)


@BUDGET
@given(DOCS, st.binary(max_size=40))
def test_random_yaml_documents_never_give_a_traceback(doc: str, junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        text_file, byte_file = Path(tmp) / "c.yaml", Path(tmp) / "b.yaml"
        text_file.write_text(doc, encoding="utf-8", errors="surrogatepass")
        byte_file.write_bytes(doc.encode("utf-8", "surrogatepass")[:60] + junk)
        for path in (text_file, byte_file):
            cfg = _config_or_user_error(path=str(path))
            assert cfg is None or isinstance(cfg, Config)


STUDY_KEYS = st.one_of(st.sampled_from(SPEC_KEYS), st.text(max_size=8))
MODEL_ENTRY = st.one_of(st.sampled_from(["lenet5", "", "resnet18"]), VALUES,
                        st.dictionaries(st.sampled_from(MODEL_KEYS), VALUES, max_size=3),
                        st.fixed_dictionaries({"name": st.sampled_from(["lenet5", "vgg16"])},
                                              optional={k: VALUES for k in MODEL_KEYS if k != "name"}))


@BUDGET
@given(st.dictionaries(STUDY_KEYS, VALUES, max_size=5), st.one_of(st.none(), st.lists(MODEL_ENTRY, max_size=3)))
def test_random_study_specs_never_give_a_traceback(raw: dict[str, Any], models: list[Any] | None) -> None:
    raw = {"name": "fuzz", **raw} if "name" not in raw else raw
    if models is not None:
        raw["models"] = models
    try:
        spec = parse_spec(raw, "fuzz.yaml")
    except UserError as exc:
        _one_line(exc)
        assert str(exc).startswith("fuzz.yaml: "), str(exc)[:300]
    else:
        assert isinstance(spec, StudySpec)
    with tempfile.TemporaryDirectory() as tmp:  # the same mapping through the file reader
        p = Path(tmp) / "s.yaml"
        p.write_text(_yaml_doc(raw), encoding="utf-8", errors="surrogatepass")
        try:
            load_spec(p)
        except UserError as exc:
            _one_line(exc)


def test_the_alias_bomb_is_refused_fast_in_small_memory() -> None:
    """The 343-byte "billion laughs" document: refused in well under 2 s, with one short line."""
    import time
    import tracemalloc

    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    bomb += "sched:\n  milestones: *i\n"
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load_yaml_text(bomb, "bomb.yaml")
    except UserError as exc:
        message = str(exc)
    else:
        raise AssertionError("the alias bomb was accepted")
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(bomb) < 400 and seconds < 2.0 and peak < 20 * 2**20, (len(bomb), seconds, peak)
    assert message.startswith("bomb.yaml: YAML syntax error at line 2, column 8: YAML aliases are not allowed (*a)")
    assert len(message) < 200
