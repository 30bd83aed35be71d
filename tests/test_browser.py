"""The sweep as users see it: a real MLflow server's UI and the HTML report, rendered in headless Chromium.

Needs a ``chromium`` executable (Debian: ``apt-get install -y chromium``). Screenshots are kept in
``tests/artifacts/`` (``mlflow-runs.png``, ``mlflow-compare.png``, ``report.png``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sbsearch.cli import main
from sbsearch.report import load_sweep
from sbsearch.tracking import Tracker, TrackingTarget

pytestmark = pytest.mark.slow

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
ARTIFACTS = Path(__file__).parent / "artifacts"
SPEC = {
    "name": "browser-tiny", "seed": 0,
    "data": {"dataset": "digits", "batch_size": 128},
    "model": {"name": "small_cnn", "width": 4, "depth": 1},
    "train": {"epochs": 2, "lr": 0.01},
    "space": {"expansion": {"factor": [1, 2], "fill": [0.0, 0.5]}, "dropout": {"rate": {"low": 0.0, "high": 0.3}}},
    "search": {"sampler": "random", "trials": 3, "parallel": 1},
}

if CHROMIUM is None:  # CI installs it (.ci/run); elsewhere these tests are skipped with the reason
    pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("CI"), reason="needs chromium: apt-get install -y chromium")]


def chromium(url: str, *args: str, budget_ms: int = 15000) -> str:
    """Render ``url`` in headless Chromium and return what it printed (the DOM with ``--dump-dom``)."""
    assert CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    return done.stdout


def screenshot(url: str, path: Path, size: str = "1600,1000") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chromium(url, f"--screenshot={path}", f"--window-size={size}")
    assert path.exists() and path.stat().st_size > 10_000, f"no screenshot of {url}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real sweep run through the CLI, which ends by writing the report."""
    base = tmp_path_factory.mktemp("browser")
    spec = base / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC), encoding="utf-8")
    out = base / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    assert (out / "report" / "index.html").exists(), "sbsearch run did not write the report"
    return out


@pytest.fixture(scope="module")
def mlflow_url(sweep_out: Path) -> Iterator[str]:
    """A real ``mlflow server`` over the sweep's SQLite store on 127.0.0.1, stopped by its PID afterwards."""
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    log = open(sweep_out.parent / "mlflow-server.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{sweep_out / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=sweep_out.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (sweep_out.parent / "mlflow-server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not answer within 240 s"
            time.sleep(1)
        yield url
    finally:
        # The server runs workers in its own session: stop that process group, which only it leads.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def _runs(sweep_out: Path) -> tuple[str, str, list[object]]:
    data = load_sweep(sweep_out)
    assert data.tracking_uri is not None and data.parent_run_id is not None
    tracker = Tracker(TrackingTarget(data.tracking_uri, SPEC["name"], (sweep_out / "mlartifacts").as_uri()))
    return tracker.experiment_id(), data.parent_run_id, tracker.trial_runs(data.parent_run_id)


def _text(dom: str) -> str:
    """The page's visible text, roughly: tags out, entities decoded, spaces collapsed."""
    import html

    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_mlflow_runs_page_shows_the_sweep(sweep_out: Path, mlflow_url: str) -> None:
    experiment, _, children = _runs(sweep_out)
    url = f"{mlflow_url}/#/experiments/{experiment}/runs"
    text = _text(chromium(url, "--dump-dom", "--window-size=1600,1000"))
    assert f"sweep {SPEC['name']}" in text, "the parent run is not on the runs page"
    # Child runs sit folded under their parent; the page counts them among its runs.
    assert f"{1 + len(children)} matching runs" in text
    screenshot(url, ARTIFACTS / "mlflow-runs.png")


def test_mlflow_compare_view_shows_each_trial_with_its_parameters(sweep_out: Path, mlflow_url: str) -> None:
    experiment, _, children = _runs(sweep_out)
    assert len(children) == SPEC["search"]["trials"]  # type: ignore[index]
    ids = json.dumps([run.info.run_id for run in children])  # type: ignore[attr-defined]
    url = (f"{mlflow_url}/#/compare-runs?runs={urllib.parse.quote(ids)}"
           f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")
    text = _text(chromium(url, "--dump-dom", "--window-size=1600,1400"))
    assert f"Comparing {len(children)} Runs" in text
    for run in children:
        assert run.info.run_name in text, f"{run.info.run_name!r} is not shown"  # type: ignore[attr-defined]
        assert run.info.run_name.startswith("trial-")  # type: ignore[attr-defined]
        for key in ("expansion.factor", "expansion.fill", "dropout.rate"):
            assert key in text
            assert run.data.params[key] in text, f"{key}={run.data.params[key]} of {run.info.run_name} is not shown"  # type: ignore[attr-defined]
    screenshot(url, ARTIFACTS / "mlflow-compare.png", "1600,1100")


_PROBE = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "image-probe";
  pre.textContent = [...document.images].map(i => `${i.getAttribute("src")} ${i.naturalWidth} ${i.naturalHeight}`).join("\\n");
  document.body.appendChild(pre);
});
</script>"""


def test_report_plots_load_in_the_browser(sweep_out: Path) -> None:
    folder = sweep_out / "report"
    page = (folder / "index.html").read_text(encoding="utf-8")
    # A copy beside the original (so relative image paths resolve) reports each image's decoded size.
    probe = folder / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        dom = chromium(probe.as_uri(), "--dump-dom", "--allow-file-access-from-files")
    finally:
        probe.unlink()
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, "the report page did not finish loading"
    sizes = {src: (int(w), int(h)) for src, w, h in (line.split() for line in found.group(1).strip().splitlines())}
    expected = set(re.findall(r'<img src="([^"]+)"', page))
    assert expected and set(sizes) == expected
    for src, (w, h) in sizes.items():
        assert w > 0 and h > 0, f"{src} did not load"
    assert "sbsearch report: browser-tiny" in _text(dom)
    screenshot((folder / "index.html").as_uri(), ARTIFACTS / "report.png", "1200,2200")
