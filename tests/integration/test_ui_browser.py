"""What a researcher first sees of a sweep in the MLflow UI, in a real headless Chromium (slow; run by .ci/run).

A smoke sweep on a real local Ray and a sqlite store, the `mlflow ui` command it prints (on a free port), then with
a fresh browser profile each: the experiment list and a click on the sweep's experiment, the printed runs-table
link, the printed chart link. Screenshots go to the test's tmp folder and, when $SKELDIFF_ARTIFACTS is set (.ci/run),
to $SKELDIFF_ARTIFACTS/ui; the folder is printed.

Needs the `playwright` Python package (the `dev` extra) and a Chromium on the machine (Debian's `chromium`; another
binary through $SKELDIFF_CHROMIUM). Playwright never downloads a browser here. Without them the test is skipped,
unless $SKELDIFF_REQUIRE_BROWSER=1 (.ci/run) turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, wait_for_health

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "tdsm-synthetic-u5-sweeps"
# Launch flags that keep a headless Chromium off the network and out of the sandbox a container may forbid.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000      # a page of the UI on 2 busy cores: its JS bundle is ~30 MB


def chromium_or_skip() -> str:
    """The Chromium binary, or a skip (a failure under SKELDIFF_REQUIRE_BROWSER=1) naming what is missing."""
    binary = os.environ.get("SKELDIFF_CHROMIUM") or shutil.which("chromium")
    missing = []
    if not binary or not Path(binary).exists():
        missing.append("a Chromium binary (apt-get install chromium, or set SKELDIFF_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("SKELDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def link(stderr: str, label: str) -> str:
    """A URL the sweep printed on the line that says `label`."""
    found = re.search(re.escape(label) + r".*?(http://\S+)", stderr)
    assert found, f"no '{label}' link in:\n{stderr[-3000:]}"
    return found.group(1)


@contextlib.contextmanager
def mlflow_ui(command: str, port: int, log: Path):
    """The printed `mlflow ui ...` command, with this venv's mlflow and the given port."""
    args = shlex.split(command)
    assert args[0] == "mlflow" and args[-2] == "--port", command
    args = [str(Path(sys.executable).parent / "mlflow"), *args[1:-1], str(port), "--host", "127.0.0.1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", log, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)           # gunicorn / uvicorn workers with it
        proc.wait(timeout=60)


class Browser:
    """One fresh Chromium profile per `page()` (what a researcher opening a link has: no localStorage)."""

    def __init__(self, playwright, binary: str, shots: Path):
        self.playwright, self.binary, self.shots = playwright, binary, shots
        self.contexts = []

    def page(self):
        context = self.playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="skeldiff-chromium-"), executable_path=self.binary, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        return page

    def shot(self, page, name: str) -> None:
        page.wait_for_timeout(1500)           # charts animate in
        page.screenshot(path=str(self.shots / f"{name}.png"))

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def test_sweep_opens_on_its_runs_table_and_its_charts_lead_with_the_objective(tmp_path):
    binary = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONUNBUFFERED="1", MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true")
    sweep = subprocess.run(
        [sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--num-samples", "3", "--splits", "synthetic-u5",
         "--set", "train.steps=40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
         "--storage-path", str(tmp_path / "results"), "--tracking-uri", uri],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    parent_id = json.loads(sweep.stdout.strip().splitlines()[-1])["sweeps"][0]["parent_run_id"]
    runs_link = link(sweep.stderr, "MLflow runs table of this sweep")
    charts_link = link(sweep.stderr, "its charts, objective first:")
    command = re.search(r"^browse: (mlflow ui .*)$", sweep.stderr, re.M).group(1)
    printed_port = command.split()[-1]
    assert runs_link.startswith(f"http://127.0.0.1:{printed_port}/#/experiments/") and "workflowType=" in runs_link

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    name = client.get_run(parent_id).info.run_name
    trials = [r.info.run_name for r in client.search_runs([exp.experiment_id], "tags.ray_trial_id != ''")]
    assert len(trials) == 3 and all(t.startswith("T=") for t in trials)

    shots = Path(os.environ.get("SKELDIFF_ARTIFACTS") or tmp_path) / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    print(f"UI screenshots: {shots}", file=sys.stderr)
    port = free_port()                            # the printed port may be taken again by now (5000: anyone's UI)
    with mlflow_ui(command, port, tmp_path / "mlflow-ui.log") as base, sync_playwright() as playwright:
        browser = Browser(playwright, binary, shots)
        try:
            # 1. The experiment list, then a click on the sweep's experiment, in a fresh profile: the runs table.
            # Plain MLflow 3.17 opens the GenAI overview there whatever mlflow.experimentKind says
            # (mlflow/mlflow#24498); the printed command serves it through `--app-name skeldiff`
            # (service/tracking/ui.py), which makes Model training the choice of a browser that has none.
            assert "--app-name skeldiff" in command
            page = browser.page()
            page.goto(f"{base}/#/experiments")
            page.get_by_role("link", name=EXPERIMENT, exact=True).click()
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
            expect(page.get_by_text(name, exact=True).first).to_be_visible()        # the sweep's parent run
            expect(page.get_by_text("Detect Issues").first).not_to_be_visible()
            assert re.search(rf"/experiments/{exp.experiment_id}/runs\b", page.url), page.url
            browser.shot(page, "1-list-click-fresh-profile-runs")
            # A choice the user makes is kept: after a click on "GenAI", the list opens the GenAI overview.
            page.goto(f"{base}/#/experiments")
            page.get_by_role("button", name="GenAI", exact=True).click()
            page.wait_for_function("localStorage.getItem('mlflow.workflowType_v1') === JSON.stringify('genai')")
            page.reload()                         # the choice outlives the page: a new visit to the list
            page.get_by_role("link", name=EXPERIMENT, exact=True).click()
            expect(page.get_by_text("Detect Issues").first).to_be_visible()
            assert "/overview" in page.url, page.url
            browser.shot(page, "2-list-click-after-choosing-genai")

            # 2. The printed runs-table link in a fresh profile: the runs table of this sweep, every trial by name.
            page = browser.page()
            page.goto(runs_link.replace(f":{printed_port}/", f":{port}/"))
            expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
            for trial in trials:
                expect(page.get_by_text(trial, exact=True).first).to_be_visible()
            expect(page.get_by_text("Detect Issues").first).not_to_be_visible()
            browser.shot(page, "3-printed-runs-link")

            # 3. The printed chart link: the objective's section first, its bar chart (one bar per trial) leading;
            # the overhead sections (sweep/*, trial/*) collapsed after it.
            page = browser.page()
            page.goto(charts_link.replace(f":{printed_port}/", f":{port}/"))
            objective = page.get_by_text("val/zsl_top1_max", exact=True).first
            expect(objective).to_be_visible()
            sections = {s: page.get_by_text(s, exact=True).first for s in ("val", "sweep", "trial")}
            tops = {s: loc.bounding_box()["y"] for s, loc in sections.items()}
            assert tops["val"] < objective.bounding_box()["y"] < tops["sweep"] < tops["trial"], tops
            expect(page.get_by_text("sweep/overhead_share_max", exact=True).first).not_to_be_visible()
            for trial in trials:
                expect(page.get_by_text(trial, exact=True).first).to_be_visible()
            browser.shot(page, "4-printed-chart-link")
        finally:
            browser.close()
    assert sorted(p.name for p in shots.glob("*.png")) == [
        "1-list-click-fresh-profile-runs.png", "2-list-click-after-choosing-genai.png",
        "3-printed-runs-link.png", "4-printed-chart-link.png"]
