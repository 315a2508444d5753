"""mmbalance report: one self-contained HTML page (images as data: URIs, no network reference)
for a run, an experiment and a diagnosis; rendered by headless Chromium when it is installed."""
from __future__ import annotations

import base64
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmbalance.experiments.report import build_report, write_report
from mmbalance.registry import ConfigError

from _analysis_fixtures import cli, train_tiny, write_npz

CHROMIUM = Path("/usr/bin/chromium")


class Page(HTMLParser):
    """Tags, attributes and text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]

    @property
    def plain(self) -> str:
        return " ".join(self.text)


def check_self_contained(text: str) -> Page:
    """Every <img> is a data: URI, nothing is fetched from anywhere (no http(s) reference, no
    external script or style sheet)."""
    page = Page(text)
    assert "http://" not in text and "https://" not in text
    imgs = page.all("img")
    assert imgs and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    for a in imgs:
        png = base64.b64decode(a["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXtSoftware" not in png  # no text chunk naming a web address
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    for t, a in page.tags:
        for k in ("src", "href"):
            if k in a:
                assert a[k].startswith("data:"), (t, a[k][:40])
    return page


def render_in_chromium(path: Path, tmp_path: Path) -> str:
    """The DOM headless Chromium builds from the page (network off)."""
    out = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_run_report_is_self_contained_and_complete(tmp_path):
    rd = tmp_path / "run"
    train_tiny(rd, epochs=2)
    # the run trained on in-memory data: its config names the default dataset, so analyse with the data
    from helpers import tiny_data
    from mmbalance.experiments.analyze import analyze_run

    analyze_run(rd, data=tiny_data(), progress=False)
    path = write_report(rd)
    assert path == rd / "report.html"
    text = path.read_text()
    page = check_self_contained(text)
    assert f"mmbalance train --config {rd / 'config.yaml'}" in page.plain
    assert len(page.all("table")) >= 5  # results, per modality, per class, error matrices, spectrum
    assert "probe gap" in page.plain and "contribution" in page.plain and "fc[a]" in page.plain
    assert "epochs: 2" in page.plain  # the configuration
    link = next(a for a in page.all("a") if a.get("download") == "curves.csv")
    assert base64.b64decode(link["href"].split(",", 1)[1]) == (rd / "plots" / "curves.csv").read_bytes()
    if CHROMIUM.exists():
        dom = render_in_chromium(path, tmp_path)
        rendered = Page(dom)
        assert len(rendered.all("table")) == len(page.all("table"))
        assert [a["src"][:30] for a in rendered.all("img")] == [a["src"][:30] for a in page.all("img")]


def test_experiment_and_diagnosis_reports(tmp_path, capsys):
    npz = write_npz(tmp_path / "tiny.npz", signal={"a": 1.5, "b": 0.3})
    exp = tmp_path / "exp"
    from mmbalance.experiments.runner import run_experiment

    run_experiment(["joint", "uni-a=unimodal:modality=a", "uni-b=unimodal:modality=b"], [0], exp,
                   overrides={"dataset.name": str(npz), "train.epochs": 1, "train.batch_size": 16},
                   command=f"mmbalance experiment --runs joint ... --output-dir {exp}")
    assert cli(["report", str(exp)]) == 0  # analyses the experiment first (no analysis.json yet)
    assert (exp / "analysis.json").exists()
    page = check_self_contained((exp / "report.html").read_text())
    command = (exp / "command.txt").read_text().strip()
    assert command in page.plain
    assert any("comparison" in a.get("alt", "") for a in page.all("img"))
    assert any("imbalance_gap" in a.get("alt", "") for a in page.all("img"))
    assert "uni-a" in page.plain and "probe gap b" in page.plain

    out = tmp_path / "diag"
    assert cli(["diagnose", str(npz), "--epochs", "1", "--output-dir", str(out), "--train.batch_size", "16",
                "--jobs", "1"]) == 0
    text = (out / "report.html").read_text()
    page = check_self_contained(text)
    assert "Verdict" in page.plain and f"mmbalance diagnose {npz}" in page.plain
    assert len(page.all("table")) >= 2 and len(page.all("img")) >= 2
    # report rebuilt from diagnosis.json alone
    assert cli(["report", str(out), "--output", str(tmp_path / "again.html")]) == 0
    again = Page((tmp_path / "again.html").read_text())
    assert len(again.all("table")) == len(page.all("table"))
    if CHROMIUM.exists():
        rendered = Page(render_in_chromium(out / "report.html", tmp_path))
        assert len(rendered.all("table")) == len(page.all("table")) and len(rendered.all("img")) == len(page.all("img"))


def test_report_refuses_a_folder_without_results(tmp_path, capsys):
    with pytest.raises(ConfigError, match="holds no run, experiment or diagnosis"):
        build_report(tmp_path)
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err

