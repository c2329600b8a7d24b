"""The CPU peak for MFU, cached per host (cnnscale.profile.peakcache): written once, reused, refreshed on request,
shared safely by concurrent processes, warmed before a launch without torch in the parent, and used by training."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from cnnscale.errors import UserError
from cnnscale.profile import mfu, peak, peakcache
from cnnscale.profile.peakcache import cached_peak, peak_key, read_peak, warm_peak_cache


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(peakcache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "peak"


class Measure:
    def __init__(self, values: list[float], wait: float = 0.0) -> None:
        self.values, self.wait, self.calls = values, wait, 0

    def __call__(self) -> float:
        time.sleep(self.wait)
        self.calls += 1
        return self.values[self.calls - 1]


def test_written_once_reused_and_refreshed(cache: Path) -> None:
    key = peak_key(3, "fp32")
    measure = Measure([0.25, 0.4])
    assert cached_peak(key, measure) == (0.25, "measured", 0.0)
    (entry,) = cache.glob("*.json")
    doc = json.loads(entry.read_text())  # strict JSON, the key's fields beside the value
    assert doc["tflops"] == 0.25 and doc["threads"] == 3 and doc["dtype"] == "fp32" and doc["cpu"]
    assert doc["host"] and doc["torch"] == peakcache.torch_version()
    tflops, status, age = cached_peak(key, measure)
    assert (tflops, status, measure.calls) == (0.25, "hit", 1) and 0 <= age < 60
    assert cached_peak(key, measure, refresh=True) == (0.4, "remeasured", 0.0) and measure.calls == 2
    assert read_peak(key)["tflops"] == 0.4


def test_keyed_by_threads_dtype_and_torch_version(cache: Path) -> None:
    a, b, c = peak_key(1, "fp32"), peak_key(2, "fp32"), peak_key(1, "bf16")
    d = peakcache.PeakKey(a.host, a.cpu, 1, "0.0.0", "fp32")
    assert len({k.filename for k in (a, b, c, d)}) == 4
    cached_peak(a, Measure([0.1]))
    assert read_peak(a) is not None and all(read_peak(k) is None for k in (b, c, d))


def test_a_corrupt_entry_is_measured_again(cache: Path) -> None:
    key = peak_key(1)
    cache.mkdir(parents=True)
    (cache / key.filename).write_text('{"tflops": NaN')
    assert cached_peak(key, Measure([0.3]))[:2] == (0.3, "measured")


def test_concurrent_processes_measure_once(cache: Path) -> None:
    """Four at once (each its own open file, as separate processes would be): one measures, the rest wait on the
    lock and read its value."""
    key, measure, got = peak_key(1), Measure([0.5, 0.6, 0.7, 0.8], wait=0.3), []
    threads = [threading.Thread(target=lambda: got.append(cached_peak(key, measure))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert measure.calls == 1 and sorted(s for _, s, _ in got) == ["hit", "hit", "hit", "measured"]
    assert {v for v, _, _ in got} == {0.5}


def test_training_uses_the_cached_value_and_records_source_and_age(cache: Path) -> None:
    key = peak_key(torch.get_num_threads(), "fp32")
    cached_peak(key, Measure([1.25]))
    info = mfu.mfu_setup(torch.device("cpu"), mfu.MfuInputs(flops_per_img=1e6))
    assert info["peak_tflops"] == 1.25 and info["peak_source"] == "measured:cpu matmul+conv fp32"
    assert info["peak_cache"] == "hit" and info["peak_age_s"] >= 0


def test_warm_hit_reads_the_file_without_a_child(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached_peak(peak_key(2, "fp32"), Measure([0.2]))

    def no_child(*a: object, **k: object) -> None:
        raise AssertionError("a cache hit must not start a process")

    monkeypatch.setattr(subprocess, "run", no_child)
    (hit,) = warm_peak_cache(2)
    assert hit["tflops"] == 0.2 and hit["peak_cache"] == "hit"
    with pytest.raises(UserError, match="threads must be >= 1"):
        warm_peak_cache(0)


def test_warm_miss_measures_in_a_child_at_the_ranks_threads(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """The child is replaced by a stand-in module (no torch import): what matters here is that the parent passes
    the thread count and dtypes, sets OMP_NUM_THREADS, and reads the child's JSON line."""
    (tmp_path / "fake_peak.py").write_text(
        "import json, os, sys\n"
        "print('noise')\n"
        "print(json.dumps([{'dtype': 'fp32', 'tflops': 0.7, 'peak_cache': 'measured', 'peak_age_s': 0.0,\n"
        "                   'argv': sys.argv[1:], 'omp': os.environ['OMP_NUM_THREADS']}]))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(peakcache, "PEAK_MODULE", "fake_peak")
    (res,) = warm_peak_cache(3)
    assert res["tflops"] == 0.7 and res["argv"] == ["--threads", "3", "--dtypes", "fp32"] and res["omp"] == "3"
    (tmp_path / "fake_peak.py").write_text("import sys\nsys.exit('boom: no torch')\n")
    with pytest.raises(UserError, match="boom: no torch"):
        warm_peak_cache(3)


def test_peak_child_main_caches_and_prints_one_json_line(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(mfu, "_matmul_tflops", lambda dtype, size, seconds: 0.9)
    threads = torch.get_num_threads()
    try:
        assert peak.main(["--threads", "1", "--dtypes", "fp32,bf16"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["dtype"], r["tflops"], r["peak_cache"]) for r in out] == [("fp32", 0.9, "measured"),
                                                                         ("bf16", 0.9, "measured")]
    assert read_peak(peak_key(1, "bf16"))["tflops"] == 0.9
