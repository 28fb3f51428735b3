"""report.html opened in a real headless browser (Debian's chromium through selenium and
chromedriver; .ci/run installs them): its sections are there, every image decodes, the
console is clean, and a screenshot is saved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.rundir import html_report
from tests.conftest import SHRINK, main_here, read_json, train_here

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RUN_SECTIONS = ["recipe", "weights", "freeze", "curves", "confusion", "per-class",
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
        " scripts: document.scripts.length, height: document.body.scrollHeight,"
        " width: document.documentElement.scrollWidth,"
        " verdict: (document.getElementById('verdict') || {}).innerText}")
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
    # the verdict reads on one screen (1200 x 900) before any detail is opened
    assert state["height"] <= 900 and state["width"] <= 1200, state
    metrics = read_json(reported_run / "metrics.json")
    assert (f"images: train {metrics['train_images']}, val {metrics['val_images']}, test "
            f"{metrics['test_images']}") in state["verdict"]
    assert f"Test accuracy {metrics['test/acc']:.4f}" in state["verdict"]
    assert state["images"] and all(ok for _, ok in state["images"]), state["images"]
    alts = [alt for alt, _ in state["images"]]
    assert "learning curves" in alts and any(a.startswith("reliability") for a in alts)
    assert sum(a.startswith("#") for a in alts) >= 1  # thumbnails of wrong predictions
    assert state["errors"] == [] and state["scripts"] == 0
    assert (tmp_path / "run_report.png").stat().st_size > 10_000


def test_a_sweeps_report_links_its_jobs(browser, reported_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Eight jobs of a study (each its own learning rate, long overrides, one that learned
    nothing, one pruned): the leaderboard fits the window, every column in view."""
    sweep = tmp_path / "sweep"
    for job in range(8):
        shutil.copytree(reported_run, sweep / str(job))
        metrics = read_json(sweep / str(job) / "metrics.json")
        metrics["val/acc"] = round(metrics["val/acc"] * (1 - job / 10), 6)  # ranked in order
        metrics["lr"] = 10 ** (-3 - job / 7)
        if job == 6:
            metrics["warnings"] = ["every validation image was called one class (3)"]
        if job == 7:
            metrics["pruned"] = {"epoch": 0, "of": 2, "metric": "val/acc", "value": 0.2}
        (sweep / str(job) / "metrics.json").write_text(json.dumps(metrics))
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([
            f"optim.lr={metrics['lr']}", "freeze.train_from=layer3",
            "data.augment=[{name: RandomResizedCrop, size: 32, scale: [0.5, 1.0]}]",
            f"hydra.sweeper.sampler.seed={job}"]))
    code, _, _ = main_here("report", str(sweep), capsys=capsys)
    assert code == 0 and (sweep / "report.html").is_file()
    state = open_page(browser, sweep / "report.html", tmp_path / "sweep_report.png")
    assert state["sections"] == ["leaderboard", "plot"]
    assert state["links"] == [f"{job}/report.html" for job in range(8)]
    assert all(ok for _, ok in state["images"]) and state["errors"] == []
    assert state["width"] <= 1200, state["width"]  # no column off-screen
    text = (sweep / "report.html").read_text()
    assert "<th>train_<wbr>seconds</th>" in text and "<th>warnings</th>" in text
    # a column no job has a value in says nothing, and is left out
    page = html_report.sweep_report(sweep, [{"rank": 1, "note": None}, {"rank": 2, "note": ""}],
                                    ["rank", "note"], None)
    assert "<th>rank</th>" in page and "<th>note</th>" not in page


def test_a_study_with_many_learning_rates_plots_one_mean_line() -> None:
    """The split-point plot's legend stays short: a line per learning rate for a grid of a
    few, one line for a study's many."""
    from finetune.sweeps.leaderboard import LEGEND_ENTRIES, Job, lr_lines

    def jobs(lrs: list[float | None]) -> list[Job]:
        return [Job(Path(str(i)), "complete", lr=lr) for i, lr in enumerate(lrs)]

    assert lr_lines(jobs([1e-3, 1e-2, 1e-3, None])) == [1e-3, 1e-2]
    few = [10.0 ** -k for k in range(LEGEND_ENTRIES)]
    assert lr_lines(jobs(few)) == sorted(few)
    assert lr_lines(jobs([*few, 0.5])) == [None]


def test_each_evaluation_shows_once_and_evaluate_replaces_its_own_split(
        reported_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run's val and test figures once each; `finetune evaluate` on the run's own test
    split takes the test row's place (it is the newer figure), on other data it adds one."""
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    assert list(html_report.evaluations(run)) == ["val", "test"]
    assert main_here("evaluate", f"run={run}", "tta=flip", capsys=capsys)[0] == 0
    assert list(html_report.evaluations(run)) == ["val", "test (finetune evaluate, tta=flip)"]
    text = (run / "report.html").read_text()
    assert text.count("<td>test (finetune evaluate, tta=flip)</td>") == 1
    assert "<td>test</td>" not in text and text.count("<td>val</td>") == 1
    eval_json = read_json(run / "eval.json")
    eval_json["data"]["overrides"] = ["data.root=elsewhere"]
    eval_json["data"]["root"] = "elsewhere"
    (run / "eval.json").write_text(json.dumps(eval_json))
    assert list(html_report.evaluations(run)) == [
        "val", "test", "test of elsewhere (finetune evaluate, tta=flip)"]


@pytest.mark.parametrize("case", ["tested", "validated", "learned nothing", "failed"])
def test_the_verdict_says_what_a_person_signs_off(case: str) -> None:
    """The box at the top: the test figure when there is one; 'validated only' without one;
    the warnings of a run that learned nothing; the status and errors of a run that did not
    complete. Calibration is said either way."""
    result = {"per_class": [], "images": 72, "acc": 0.9861, "macro/f1": 0.98, "ece": 0.02,
              "loss": 0.05}
    results = {"val": {**result, "images": 144}, **({"test": result} if case != "validated"
                                                     else {})}
    metrics = {"status": "failed" if case == "failed" else "complete", "val/acc": 0.97,
               "test_images": 72, "train_images": 500, "val_images": 144,
               **({"warnings": ["every validation image was called one class (3)"]}
                  if case == "learned nothing" else {}),
               **({"error": ["val/loss=nan: the loss diverged"]} if case == "failed" else {})}
    manifest = {"task": "multiclass", "class_names": list("0123456789"),
                "temperature": 1.5 if case == "tested" else 1.0,
                "calibration": {"fitted_on": "val", "images": 144}}
    text = html_report._verdict(metrics, manifest, results)
    boxes = {"tested": 'class="verdict tested"><b>Test accuracy 0.9861</b> on the 72 test images',
             "validated": 'class="verdict "><b>Validated only: val/acc 0.9700.</b>',
             "learned nothing": '<b>This model learned nothing usable yet:</b><ul><li>every '
                                'validation image was called one class (3)</li>',
             "failed": '<b>The run is failed.</b><p>val/loss=nan: the loss diverged</p>'}
    assert boxes[case] in text, text
    assert all(boxes[other] not in text for other in boxes if other != case)
    assert ("Calibrated: temperature 1.5000, fitted on val (144 images)" in text) == (
        case == "tested")
    assert ("Not calibrated" in text) == (case != "tested")
    assert text.count("<tr><td>") == len(results)  # each evaluation one row


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
    evaluation["test"]["images"] = "<u>72</u>"  # shown in the verdict's box
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    manifest = read_json(run / "manifest.json")
    manifest["temperature"] = 1.5  # the calibration line of the verdict
    manifest["calibration"] = {"fitted_on": "<u>val</u>", "images": "<u>9</u>"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    text = html_report.run_report(run)
    assert "<u>" not in text and "on the &lt;u&gt;72&lt;/u&gt; test images" in text
    assert "fitted on &lt;u&gt;val&lt;/u&gt; (&lt;u&gt;9&lt;/u&gt; images)" in text  # once
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "javascript:" not in text
    assert "default-src 'none'" in text
