"""The HTML fit report with plots (issue #13): rendered in headless Chromium, its embedded images load and
the verdict is there; the plots show what the results hold."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgedeploy.cli import main
from edgedeploy.results import Results

from .test_virtual_phone import Phone

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
MIB = 2**20


def render(page: Path, home: Path) -> str:
    """The DOM of ``page`` after its load event, as headless Chromium builds it (profile and caches in ``home``)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",  # type: ignore[list-item]
                        f"--user-data-dir={home / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                        page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def report_dir(host_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html")
    phone = Phone(root / "sandbox", "--sensors", "big_cores=1")
    try:
        out = root / "report"
        assert main(["profile", str(host_bundle), "--device", f"tcp:127.0.0.1:{phone.port}", "--out", str(out),
                     "--prompts", "chat-short", "doc-1k", "--runs", "3", "--warmup", "1", "--no-history"]) == 0
    finally:
        phone.stop()
    return out


@needs_chromium
def test_report_renders_in_chromium_with_images_and_verdict(report_dir: Path, tmp_path: Path) -> None:
    page = report_dir / "report.html"
    text = page.read_text()
    # Self-contained: every image is inline, nothing is fetched.
    assert re.findall(r"<img[^>]*src='([a-z]+):", text) == ["data"] * 4 and "<link" not in text
    dom = render(page, tmp_path / "chrome")
    assert 'data-images="4/4"' in dom and "images loaded: 4/4" in dom
    assert re.search(r"<h1>edgedeploy fit report: <span[^>]*>PASS</span></h1>", dom)
    assert re.search(r"<h2>llama-host: <span[^>]*>PASS</span></h2>", dom)
    assert [m for m in re.findall(r"data-plot=\"(\w+)\"", dom)] == ["memory", "thermal", "breakdown", "speed"]
    assert "| temperatures" not in dom and "temperatures (max during runs)" in dom


@needs_chromium
def test_a_broken_image_is_caught(report_dir: Path, tmp_path: Path) -> None:
    """The check can fail: corrupt one image's PNG and Chromium reports 3 of 4 loaded."""
    text = (report_dir / "report.html").read_text()
    broken = re.sub(r"base64,[A-Za-z0-9+/=]{200}", "base64,iVBORw0KGgoAAAAAAAAAAA", text, count=1)
    assert broken != text
    page = tmp_path / "broken.html"
    page.write_text(broken)
    assert 'data-images="3/4"' in render(page, tmp_path / "chrome")


@needs_chromium
def test_old_results_without_sensors_render(report_dir: Path, tmp_path: Path, capsys) -> None:
    """A results file from before variance control (no sensors, no energy, no spread) still renders: the
    thermal figure is left out, the others load."""
    data = json.loads((report_dir / "results.json").read_text())
    for model in data["models"]:
        model.pop("variance", None)
        model.pop("energy", None)
        for p in model["prompts"]:
            p.pop("energy", None)
            for r in p["warmup"] + p["runs"]:
                for k in ("sensors", "thermal", "energy", "cooldown", "pinned_cpus", "device_clock"):
                    r.pop(k, None)
            for stat in p["summary"].values():
                for k in ("mean", "ci95_low", "ci95_high", "ci95_half", "cv_pct"):
                    stat.pop(k, None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    page = tmp_path / "old.html"
    assert main(["report", str(old), "--format", "html", "--out", str(page)]) == 0, capsys.readouterr().err
    dom = render(page, tmp_path / "chrome")
    assert 'data-images="3/3"' in dom and "thermal" not in re.findall(r"data-plot=\"(\w+)\"", dom)


def test_plots_show_the_measurements(report_dir: Path) -> None:
    from edgedeploy.report import plots  # after conftest pointed MPLCONFIGDIR at a temporary folder

    results = Results.from_dict(json.loads((report_dir / "results.json").read_text()))
    model = results.models[0]
    # Memory: one line per run, each peak marked at its run's highest sample.
    fig = plots.memory_timeline(model)
    assert fig is not None
    ax = fig.axes[0]
    runs = [r for p in model.prompts for r in p.warmup + p.runs]
    markers = [ln for ln in ax.lines if ln.get_marker() == "v"]
    assert len(markers) == len(runs)
    for ln, r in zip(markers, runs, strict=True):
        assert ln.get_ydata()[0] == pytest.approx(max(max(s.rss_bytes for s in r.timeline), r.peak_rss_bytes) / MIB)
    assert "budget 8,192 MiB (above this scale)" in [t.get_text() for t in ax.texts]
    # Breakdown: the predicted bar is the estimate's parts; the measured one is the peak of record.
    bars = plots.breakdown(model).axes[0].patches
    predicted = sum(b.get_width() for b in bars if b.get_y() < 0.5)
    measured = sum(b.get_width() for b in bars if b.get_y() > 0.5)
    assert predicted == pytest.approx(model.estimate.peak_bytes / MIB, rel=1e-6)
    assert measured == pytest.approx(model.measured_peak_bytes / MIB, rel=1e-6)
    # Speed: bar heights are the means, error bars the 95% intervals.
    speed = plots.speed(model)
    decode = speed.axes[1]
    heights = [b.get_height() for b in decode.patches]
    means = [p.summary.decode_tok_s.extra["mean"] for p in model.prompts]
    assert heights == pytest.approx(means)
    caps = sorted(y for ln in decode.lines for y in ln.get_ydata())
    highs = sorted(p.summary.decode_tok_s.extra["ci95_high"] for p in model.prompts)
    assert all(any(c == pytest.approx(h) for c in caps) for h in highs)
    # Temperatures and clocks: every sampled zone and CPU has a line.
    th = plots.thermal(model)
    labels = {ln.get_label() for ax in th.axes for ln in ax.lines}
    assert {"cpu-0-0", "skin", "battery"} <= labels and any(lb.startswith("cpu") and lb[3:].isdigit() for lb in labels)
