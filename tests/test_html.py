"""``cnnscale report --html``: a self-contained page with real tables and inline plots, checked as a document and in
a real headless browser (Debian's chromium): no console errors, every image decodes, a screenshot that is not
blank, and a known number read back from the DOM."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat  # installed with matplotlib

from cnnscale.report import main as report
from cnnscale.report.plots import PIXELS

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "tests/fixtures/quickstart_study"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class _Doc(HTMLParser):
    """Tables (id -> rows of cell texts), image sources, scripts and external references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self.body_attrs: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1
        elif tag == "body":
            self.body_attrs = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if re.match(r"(https?:)?//", a.get(key) or ""):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert report.main([str(REPO / QUICKSTART), "--html", str(out), "--predict"]) == 0
    return out


def _cell(doc: _Doc, table: str, model: str, label: str, n: str, col: int) -> str:
    """The cell ``col`` of the row ``label`` at N=``n`` under ``model``'s name row in ``table``."""
    rows = doc.tables[table]
    start = next(i for i, r in enumerate(rows) if r == [model])
    return next(r[col] for r in rows[start + 1:] if r[:2] == [label, n])


def test_page_is_self_contained_with_real_tables_plots_verdicts_and_environment(page):
    text = page.read_text()
    doc = _parse(text)
    assert doc.scripts == 0 and doc.external == []
    assert {"table-scaling", "table-resources", "table-training", "table-predict", "environment"} <= set(doc.tables)
    head = doc.tables["table-scaling"][0]
    assert head[:7] == ["model", "N", "batch", "img/s", "speedup", "eff", "pred"]
    assert _cell(doc, "table-scaling", "vgg16", "default", "2", head.index("eff")) == "0.77"
    assert len(doc.images) == 4
    for src in doc.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == PIXELS
    assert "vgg16 loses 23 points at N=2" in text and "to the shared machine" in text
    env = {r[0]: r[1] for r in doc.tables["environment"][1:]}
    assert env["git_sha"] == "f4afafd" and env["torch"] == "2.14.1" and env["device_type"] == "cpu"
    assert "synthetic_size: 2048" in text and "comm_hook: none" in text  # a run's whole config.yaml


def _browser(skip_or_fail) -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        skip_or_fail("no headless browser: install Debian's chromium (apt-get install -y chromium; "
                     "launch/test.sh does as root)")
    return found


def _run(browser: str, tmp: Path, url: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


_CHECK = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-decoded", String(imgs.filter(i => i.complete && i.naturalWidth > 0).length));
});</script></body>"""


def test_page_in_a_headless_browser(page, tmp_path, skip_or_fail):
    browser = _browser(skip_or_fail)
    # the console check is not vacuous: a page that logs an error shows up in the browser's log
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><script>console.error('cnnscale-probe')</script></body></html>")
    probe = _run(browser, tmp_path, control.as_uri(), "--dump-dom")
    assert any("cnnscale-probe" in line for line in _console_lines(probe.stderr)), probe.stderr[-2000:]
    # the page itself: a screenshot, and nothing on the console
    shot = tmp_path / "report.png"
    proc = _run(browser, tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert _console_lines(proc.stderr) == []
    with Image.open(shot) as img:
        grey = img.convert("L")
        assert grey.size == (1280, 2400)
        assert ImageStat.Stat(grey).var[0] > 200  # not blank
        dark = sum(grey.histogram()[:128]) / (grey.size[0] * grey.size[1])
        assert dark > 0.01  # text, tables and plots drawn
    # every image decodes (naturalWidth > 0), and a known number read back from the DOM
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", _CHECK))
    dom = _run(browser, tmp_path, checked.as_uri(), "--dump-dom", "--virtual-time-budget=10000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr) == []
    doc = _parse(dom.stdout)
    assert doc.body_attrs.get("data-images") == "4" and doc.body_attrs.get("data-decoded") == "4", doc.body_attrs
    head = doc.tables["table-scaling"][0]
    assert _cell(doc, "table-scaling", "vgg16", "default", "2", head.index("eff")) == "0.77"
    assert sorted(r[0] for r in doc.tables["table-predict"][1:]) == ["lenet5", "mobilenet_v2", "resnet18", "vgg16"]
