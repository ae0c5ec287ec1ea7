"""``report --format html``: one self-contained page, rendered in a real browser (headless Chromium).

The browser test needs the Debian ``chromium`` package (``.ci/run`` installs it).  It is skipped,
saying why, only outside CI; in CI (``CI`` set) a missing browser is a failure.
"""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess

import pytest

from report_fixtures import build_run
from wsss_bench.reporting.html import html_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("htmlrun"))


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory):
    from wsss_bench.plugins import load_plugins

    exporter = load_plugins().get("exporters", "html")()
    text = html_report(run_dir, exporter, gate="all", with_paper=True, per_volume=True)
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(text, encoding="utf-8")
    return path


class Tables(html.parser.HTMLParser):
    """Rows of every <table id=...> (cell texts), and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.tables, self.refs, self._id, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "table":
            self._id = a.get("id", f"t{len(self.tables)}")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "table":
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    p = Tables()
    p.feed(text)
    return p


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    p = parse(text)
    images = [r for r in p.refs if r.startswith("data:image/png;base64,")]  # figures inlined
    docs = [r for r in p.refs if not r.startswith("data:")]
    assert len(images) == 3  # Fig. 3 grid, Fig. 4 curves, boxplots
    # the only other references: each method's page in the project's own docs (local files)
    assert docs and all(r.startswith("file://") and "/docs/methods/" in r and r.endswith(".md") for r in docs)
    assert any(r.endswith("/docs/methods/cldf.md") for r in docs) and any(r.endswith("/gradcam.md") for r in docs)
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http-equiv", ""))
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert "default-src 'none'" in text  # the page may not fetch anything
    for gate in ("label", "classifier", "none"):
        assert f"Segmentation results (gate={gate})" in text
    assert 'class="ci"' in text and "Wilcoxon" in text and "failed: PluginError" in text
    assert "Dice (paper)" in text and "Dice (3D)" in text
    # what the page says about the run: versions, device, run time, warnings, one line per gate
    for fact in ("<dt>versions</dt>", "<dt>device</dt>", "Warnings of the run"):
        assert fact in text, fact
    for gate in ("label", "classifier", "none"):
        assert text.count(f"gate={gate}: ") == 1, gate
    assert set(p.tables) >= {"per-case-brats", "per-case-flare21-kidney"}
    assert len(p.tables["per-case-brats"]) == 1 + 8  # header + 8 cases


def _chromium(args, tmp_path, timeout=90):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: .ci/run must install the Debian package")
        pytest.skip("headless Chromium not installed (apt-get install chromium); the CI run installs it")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_page_renders_in_chromium(page, tmp_path):
    shot = tmp_path / "report.png"
    res = _chromium(["--window-size=1400,4000", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri()],
                    tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(str(shot))
    assert img.shape[:2] == (4000, 1400)
    gray = img[..., :3].mean(-1)
    assert gray.std() > 0.1 and (gray < 0.5).mean() > 0.01  # text, tables and figures were drawn
    # the embedded figures were decoded: some rows hold many colour pixels (overlays, boxes)
    colour = (img[..., :3].max(-1) - img[..., :3].min(-1)) > 0.3
    assert colour.sum() > 5000
    keep = os.environ.get("WSSS_BENCH_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_per_case_table_sorts_in_the_browser(page, tmp_path):
    """The inline script sorts a table on a header click; the hash '#sort=id:col:dir' applies one
    sort on load, so the DOM Chromium dumps after running the scripts shows the order."""
    before = parse(page.read_text(encoding="utf-8")).tables["per-case-brats"]
    col = before[0].index("gradcam+threshold")
    res = _chromium(["--dump-dom", f"{page.as_uri()}#sort=per-case-brats:{col}:desc"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-ready="1"' in dom  # the script ran to the end
    after = parse(dom).tables["per-case-brats"]
    values = [float(r[col]) for r in after[1:]]
    assert values == sorted(values, reverse=True)
    assert sorted(map(tuple, after[1:])) == sorted(map(tuple, before[1:]))  # same rows, reordered
    assert [float(r[col]) for r in before[1:]] != values  # it was not already in that order
    up = _chromium(["--dump-dom", f"{page.as_uri()}#sort=per-case-brats:0:asc"], tmp_path)
    cases = [r[0] for r in parse(up.stdout).tables["per-case-brats"][1:]]
    assert cases == sorted(cases)
