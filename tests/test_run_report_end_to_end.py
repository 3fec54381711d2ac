"""Two real tiny runs (`python -m simulations.run`, Flower's simulation engine), then what people look at.

Run A trains both rounds with TensorBoard on; run B's budget pays for its
first round only, so both sites skip the second one for their budget. From
their run directories alone: the progress lines, the report page (and its
screenshot in a real headless Chromium), the comparison of the two runs and
TensorBoard's event files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.privacy_ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "num-sites=2 probe-rounds=2 probe-steps=3 probe-batch-size=8 num-rounds=0 max-length=32 "
    "max-train-examples=24 max-test-examples=12"
)
SIGMA, TARGET = 2.0, 2.1  # at sample rate 8/24: 3 steps cost epsilon 1.82 (fits), 6 steps 2.40 (does not)


def launch(tiny_model_dir: Path, run_dir: Path, extra: str) -> subprocess.CompletedProcess:
    overrides = f"model='{tiny_model_dir}' {TINY} output-dir='{run_dir}' {extra}"
    return subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    a = launch(tiny_model_dir, folder / "a", "tensorboard=true")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    b = launch(tiny_model_dir, folder / "b", f"noise-multiplier={SIGMA} target-epsilon={TARGET}")
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    return {"a": (folder / "a", a.stdout), "b": (folder / "b", b.stdout)}


def fedcl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcl", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.integration
def test_the_progress_line_names_a_site_skipped_for_its_budget_and_why(runs):
    # The hand computation the skip rests on: one round fits the budget, two do not.
    rate = 8 / 24
    assert PrivacyLedger(TARGET, 1e-5, [(SIGMA, rate, 3)]).epsilon() < TARGET
    assert PrivacyLedger(TARGET, 1e-5, [(SIGMA, rate, 6)]).epsilon() > TARGET
    rows = [json.loads(line) for line in (runs["b"][0] / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"]: r["train_status"] for r in rows if r["round"] == 2} == {"site-0": "skipped", "site-1": "skipped"}

    out = runs["b"][1]
    line = next(line for line in out.splitlines() if line.startswith("round 2/2"))
    assert "2 of 2 sites answered: 0 trained, 2 skipped (site-0, site-1: privacy budget:" in line, line
    assert f"epsilon of {TARGET:g}: site-0 " in line
    first = next(line for line in out.splitlines() if line.startswith("round 1/2") and "done in" in line)
    assert "2 trained;" in first and " skipped (" not in first
    assert first.endswith("time left unknown + probe rounds not timed yet")  # round 1 (model load) times nothing
    assert out.count("final mean accuracy") == 1  # said once, by the launcher, rounded
    assert "final mean accuracy 0." in out and "report " in out and "index.html" in out


@pytest.mark.integration
def test_the_report_is_written_again_from_a_copied_run_directory_alone(runs, tmp_path):
    copy = tmp_path / "copied-run"
    shutil.copytree(runs["b"][0], copy)
    shutil.rmtree(copy / "report")
    done = fedcl("report", str(copy))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"fedcl: report {copy.resolve() / 'report' / 'index.html'} (open it in a browser; the PNG figures are beside it)"
    ]
    page = (copy / "report" / "index.html").read_text()
    for figure in ("accuracy.png", "epsilon.png", "bytes.png"):
        assert f'src="{figure}"' in page
        with Image.open(copy / "report" / figure) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, figure  # drawn, not blank
    privacy = summary(runs["b"][0])["privacy"]
    for site, entry in privacy.items():
        assert entry["stopped_for_budget"]
        assert f'<td>{site}</td><td class="num">{entry["epsilon"]:.3f}</td>' in page
    assert "Stopped for their budget:</b> site-0, site-1" in page
    assert page.count("privacy budget:") >= 2  # the rounds in which a site did not train, with the reason


@pytest.mark.integration
def test_compare_two_finished_runs(runs, tmp_path):
    out = tmp_path / "compared"
    done = fedcl("compare", str(runs["a"][0]), str(runs["b"][0]), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["run"] for row in rows] == ["a", "b"]
    for row, name in zip(rows, "ab"):
        reference = summary(runs[name][0])
        assert row["accuracy"] == reference["accuracy"]
        assert row["max_epsilon"] == max(p["epsilon"] for p in reference["privacy"].values())
    assert rows[1]["max_epsilon"] < rows[0]["max_epsilon"]  # run B stopped one round early
    assert "| a | completed |" in done.stdout and "| b | completed |" in done.stdout
    for name in ("index.html", "comparison.md", "accuracy.png", "epsilon.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.integration
def test_tensorboard_event_files_hold_the_metrics_rows(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["a"][0]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for site in ("site-0", "site-1"):
        expected = [(r["round"], r["accuracy"]) for r in rows if r["site"] == site]
        got = [(e.step, e.value) for e in events.Scalars(f"accuracy/{site}")]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert np.allclose([v for _, v in got], [v for _, v in expected], atol=1e-6)
        assert [e.value for e in events.Scalars(f"epsilon/{site}")] == pytest.approx(
            [r["epsilon"] for r in rows if r["site"] == site], rel=1e-6
        )
    assert not (runs["b"][0] / "tensorboard").exists()  # off by default


def find_chromium() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def screenshot(page: Path, png: Path) -> np.ndarray:
    binary = find_chromium()
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            "--window-size=1100,1800",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.integration
def test_the_report_page_renders_in_a_real_headless_chromium(runs, tmp_path):
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no headless Chromium: `make test` installs Debian's chromium-headless-shell when run as root")
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell; `make test` does it as root)")
    shot = screenshot(runs["a"][0] / "report" / "index.html", tmp_path / "report.png")
    blank_page = tmp_path / "blank.html"
    blank_page.write_text("<html><body></body></html>")
    blank = screenshot(blank_page, tmp_path / "blank.png")

    def ink(pixels: np.ndarray) -> tuple[float, int]:
        dark = (pixels.min(axis=2) < 200).mean()  # share of pixels that are not near-white
        colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        return dark, colours

    blank_dark, blank_colours = ink(blank)
    assert blank_dark < 0.001 and blank_colours < 5  # the check has teeth: a blank page fails it
    dark, colours = ink(shot)
    assert dark > 0.02 and colours > 200, (dark, colours)  # text, tables and the plots' colours
