"""The run-directory schema (cnnscale/records): round trips, versions, today's records, NaN, unknown keys."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cnnscale.errors import UserError
from cnnscale.records.run import find_runs, load_run
from cnnscale.records.schema import (
    SCHEMA_VERSION,
    Env,
    Point,
    RecordError,
    Summary,
    read_env,
    read_point,
    read_summary,
    write_env,
    write_point,
    write_summary,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TODAY = FIXTURES / "records" / "main-3152e35"  # a LeNet run written by main at 3152e35, before the schema
STUDY = FIXTURES / "runs" / "cpu_study"

ENV = Env(model="resnet18", params=11_173_962, fwd_flops_per_img=1.11e9, train_flops_per_img=3.33e9,
          world_size=2, num_nodes=1, hostnames=["a", "a"], device_type="cpu", versions={"torch": "2.14.1"},
          zero_stage=None, predicted_rank_bytes={"total": 10})
SUMMARY = Summary(status="ok", model="resnet18", world_size=2, params=11_173_962, micro_batch=16, grad_accum=1,
                  global_batch=32, steps=20, img_per_s=23.4, final_loss=2.3, rank_peak_rss_bytes=[1, 2],
                  rank_max_memory_allocated_bytes=[None, None])
POINT = Point(study="s", id="resnet18-ws2-no-mb16", model="resnet18", world_size=2, status="oom", micro_batch=16,
              global_batch=32, overrides={"data.num_workers": 0}, error="RuntimeError: out of memory", seconds=4.5)


def _strict_json(path: Path) -> dict:
    """Parse as a strict JSON reader (jq, a browser) would: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize(("record", "write", "read"), [(ENV, write_env, read_env),
                                                       (SUMMARY, write_summary, read_summary),
                                                       (POINT, write_point, read_point)])
def test_each_record_round_trips_through_its_file_and_dict(tmp_path, record, write, read):
    path = write(tmp_path, record)
    assert path == tmp_path / record.FILE
    back = read(tmp_path)
    assert back == record and back.schema_version == SCHEMA_VERSION
    data = _strict_json(path)
    assert data["schema_version"] == SCHEMA_VERSION and data == record.to_dict()
    assert type(record).from_dict(record.to_dict()) == record
    assert [p.name for p in tmp_path.iterdir()] == [record.FILE]  # atomic: no temp file left behind


def test_unknown_future_version_is_refused_with_one_line_naming_file_and_versions(tmp_path):
    write_summary(tmp_path, SUMMARY)
    data = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1, "new": 1}))
    with pytest.raises(UserError) as exc:
        read_summary(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "summary.json") in msg
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg and f"highest known: {SCHEMA_VERSION}" in msg
    with pytest.raises(UserError, match="newer than this cnnscale reads"):
        load_run(tmp_path)


def test_records_written_by_todays_main_still_read():
    run = load_run(TODAY, with_metrics=True)
    assert run.summary.schema_version == 0 and run.env.schema_version == 0
    assert run.status == "ok" and run.summary.model == "lenet5" and run.summary.world_size == 1
    assert run.summary.params == 62006 and run.summary.peak_rss_bytes == 779_022_336
    assert run.env.flops_per_img == 3204720.0 and run.env.param_count == 62006  # schema 0 name of the FLOPs
    assert run.env.predicted_rank_bytes["total"] == 992096 and run.env.versions["torch"] == "2.14.1"
    assert run.config["model"]["name"] == "lenet5" and [m["step"] for m in run.metrics] == [5]
    assert run.point is None


def test_todays_study_records_read_with_their_point_from_summary():
    failed = load_run(STUDY / "nope-ws1-no-mb16")  # the study's failure record, written into summary.json
    assert failed.summary.schema_version == 0 and failed.status == "failed"
    assert failed.point.id == "nope-ws1-no-mb16" and failed.point.settings == "default"
    assert failed.point.status == "failed" and "unknown model 'nope'" in failed.point.error
    ok = load_run(STUDY / "lenet5-ws2-no-mb64")
    assert ok.point.world_size == 2 and ok.point.seconds == 40.0 and ok.point.scaling == "weak"
    # The preempted and running summaries of today's trainer (cnnscale/train/preempt.py, loop.py) are records too.
    pre = Summary.from_dict({"status": "preempted", "signal": "SIGUSR1", "model": "lenet5", "world_size": 2,
                             "steps": 7, "epochs_done": 0, "total_steps": 20, "wall_s": 3.5, "resume": "--resume x"})
    assert pre.status == "preempted" and pre.signal == "SIGUSR1"
    assert Summary.from_dict({"status": "running", "model": "lenet5", "world_size": 1}).steps is None


def test_nan_and_infinity_are_written_as_null(tmp_path):
    write_summary(tmp_path, Summary(status="ok", final_loss=float("nan"), img_per_s=float("inf"),
                                    rank_peak_rss_bytes=[1, 2]))
    data = _strict_json(tmp_path / "summary.json")
    assert data["final_loss"] is None and data["img_per_s"] is None
    assert read_summary(tmp_path).final_loss is None
    assert math.isnan(Summary(status="ok", final_loss=float("nan")).final_loss)  # in memory it stays what it was


def test_a_summary_with_an_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(RecordError, match=r"unknown Summary key\(s\): bogus, zz"):
        Summary.from_dict({"status": "ok", "zz": 1, "bogus": 2})
    (tmp_path / "summary.json").write_text(json.dumps({"status": "ok", "img_per_sec": 3.0}))
    with pytest.raises(RecordError, match=r"summary.json: corrupt record \(unknown Summary key\(s\): img_per_sec\)"):
        read_summary(tmp_path)
    with pytest.raises(TypeError, match="img_per_sec"):
        Summary(status="ok", img_per_sec=3.0)  # type: ignore[call-arg]


def test_wrong_types_bad_status_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(RecordError, match="Summary.world_size: expected int, got str"):
        Summary(status="ok", world_size="2")
    with pytest.raises(RecordError, match="Summary.status: unknown value 'done' .choose from: ok, failed"):
        Summary(status="done")
    with pytest.raises(RecordError, match="Point.scaling: unknown value"):
        Point(study="s", id="x", model="m", world_size=1, status="ok", scaling="sideways")
    with pytest.raises(RecordError, match="missing 1 required keyword-only argument: 'status'"):
        Summary.from_dict({"model": "m"})
    assert Summary(status="ok", peak_rss_bytes=1.4e9).peak_rss_bytes == 1_400_000_000  # older files wrote floats
    (tmp_path / "summary.json").write_text('{"status": "ok", "img_')
    with pytest.raises(RecordError, match=r"summary.json: corrupt record \(JSONDecodeError\)"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(RecordError, match=r"corrupt record \(not a JSON object\)"):
        load_run(tmp_path)


def test_one_writer_per_file_keeps_the_study_out_of_summary(tmp_path):
    with pytest.raises(RecordError, match="write a Point"):
        write_summary(tmp_path, Summary(status="ok", point={"id": "x"}))
    with pytest.raises(RecordError, match="train_flops_per_img"):
        write_env(tmp_path, Env(flops_per_img=1.0))
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "env.json").exists()


def test_a_point_the_study_marked_failed_is_failed_whatever_summary_says(tmp_path):
    write_summary(tmp_path, SUMMARY)  # the trainer finished ...
    write_point(tmp_path, POINT)      # ... but the study judged the launch oom
    run = load_run(tmp_path)
    assert run.summary.status == "ok" and run.status == "oom"
    only_point = tmp_path / "never-started"
    write_point(only_point, Point(study="s", id="x", model="m", world_size=4, status="timeout", error="t"))
    assert find_runs([tmp_path]) == [tmp_path]  # a root that is a run is not searched further
    assert find_runs([only_point]) == [only_point]
    run = load_run(only_point)
    assert run.summary is None and run.status == "timeout"


def test_find_runs_sees_point_only_directories_and_skips_checkpoints(tmp_path):
    shutil.copytree(TODAY, tmp_path / "a")
    write_point(tmp_path / "b", POINT)
    write_summary(tmp_path / "a" / "checkpoints" / "step_1", SUMMARY)
    assert find_runs([tmp_path]) == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(UserError, match="no such run directory"):
        find_runs([tmp_path / "missing"])
