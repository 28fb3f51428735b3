"""report.html opened in a real headless browser (Debian's chromium through selenium and
chromedriver; .ci/run installs them): its sections are there, every image decodes, the
console is clean, and a screenshot is saved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from finetune.rundir import html_report
from tests.conftest import SHRINK, main_here, read_json, train_here

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RUN_SECTIONS = ["summary", "recipe", "weights", "freeze", "curves", "confusion", "per-class",
                "calibration", "wrong"]
SCREENSHOTS = Path(os.environ.get("FINETUNE_SCREENSHOTS", "")) if os.environ.get(
    "FINETUNE_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def browser():
    """A headless chromium, or a skip saying what is missing (CI installs both)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, page: Path, shot: Path) -> dict:
    """Load the page; (section ids, images that did not decode, console errors)."""
    browser.get(page.resolve().as_uri())
    state = browser.execute_script(
        "return {sections: [...document.querySelectorAll('section')].map(s => s.id),"
        " images: [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]),"
        " links: [...document.querySelectorAll('a')].map(a => a.getAttribute('href')),"
        " scripts: document.scripts.length}")
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1200, min(max(900, height), 6000))
    browser.save_screenshot(str(shot))
    if SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOTS / shot.name)
    return {**state, "errors": errors}


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with a test split (digits, data.test_fraction) and its report.html."""
    run = tmp_path_factory.mktemp("report") / "run"
    return train_here("recipe=quickstart", "weights.source=none", "data.test_fraction=0.2",
                      "trainer.max_epochs=2", *[a for a in SHRINK[1:] if a != "eval.report=false"],
                      run_dir=run)


def test_a_runs_report_in_a_real_browser(browser, reported_run: Path, tmp_path: Path) -> None:
    page = reported_run / "report.html"
    state = open_page(browser, page, tmp_path / "run_report.png")
    assert state["sections"] == RUN_SECTIONS
    assert state["images"] and all(ok for _, ok in state["images"]), state["images"]
    alts = [alt for alt, _ in state["images"]]
    assert "learning curves" in alts and any(a.startswith("reliability") for a in alts)
    assert sum(a.startswith("#") for a in alts) >= 1  # thumbnails of wrong predictions
    assert state["errors"] == [] and state["scripts"] == 0
    assert (tmp_path / "run_report.png").stat().st_size > 10_000


def test_a_sweeps_report_links_its_jobs(browser, reported_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(reported_run, sweep / job)
    metrics = read_json(sweep / "1" / "metrics.json")
    metrics["val/acc"] = round(metrics["val/acc"] / 2, 6)  # a worse job, ranked second
    (sweep / "1" / "metrics.json").write_text(json.dumps(metrics))
    code, _, _ = main_here("report", str(sweep), capsys=capsys)
    assert code == 0 and (sweep / "report.html").is_file()
    state = open_page(browser, sweep / "report.html", tmp_path / "sweep_report.png")
    assert state["sections"] == ["leaderboard", "plot"]
    assert state["links"] == ["0/report.html", "1/report.html"]
    assert all(ok for _, ok in state["images"]) and state["errors"] == []


def test_hostile_run_dir_text_is_escaped_and_bad_thumbnails_dropped(reported_run: Path,
                                                                    tmp_path: Path) -> None:
    """A run dir from someone else cannot put markup or a script into its page: text is
    escaped, a thumbnail that is not a PNG data URI is not used, and the page allows no
    script (Content-Security-Policy)."""
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    evaluation = read_json(run / "evaluation.json")
    wrong = evaluation["val"]["confidently_wrong"]
    wrong[0]["label"] = "<script>alert(1)</script>"
    wrong[0]["thumbnail"] = "javascript:alert(1)"
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    text = html_report.run_report(run)
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "javascript:" not in text
    assert "default-src 'none'" in text
