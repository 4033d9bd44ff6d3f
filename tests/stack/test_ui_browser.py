"""The Prefect UI of the stack in a real headless Chromium (Debian's `chromium` package): every deployment is
listed, and the last incident's post-incident report is there as a rendered markdown artifact."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from deployments.stack import deployment_names
from tests.stack_kit import (
    PROJECT_DIR,
    RunningStack,
    api,
    expected_deployments,
    prefect_yaml,
    run_deployment,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
PAGE_TIMEOUT_S = 90.0
RECOVERY = "recover-daemon-crash/auto"


class _Text(HTMLParser):
    """The visible text of an HTML document, words separated by single spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def page_text(url: str, profile: Path, wanted: list[str]) -> str:
    """The text Chromium renders at `url` once every string of `wanted` is in it (the UI is a SPA: it fills the
    page from API calls after the load); fails with what it saw after PAGE_TIMEOUT_S."""
    if not Path(CHROMIUM).exists():
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver")
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    budget_ms = 5_000
    while True:
        done = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
             f"--virtual-time-budget={budget_ms}", url],
            capture_output=True, text=True, timeout=PAGE_TIMEOUT_S, check=False,
        )
        parser = _Text()
        parser.feed(done.stdout)
        text = re.sub(r"\s+", " ", " ".join(parser.parts))
        missing = [w for w in wanted if w not in text]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"{url}: {missing} not on the page; it shows: {text[-2000:]}"
        budget_ms = min(budget_ms * 2, 30_000)
        time.sleep(1.0)


def test_the_ui_lists_every_deployment(stack: RunningStack, tmp_path: Path) -> None:
    wanted = {name: f"{name.split('/')[1]} {name.split('/')[0]}" for name in expected_deployments()}
    seen = ""
    page = 1
    while True:
        # the list shows 10 deployments a page; its page number is in the address
        text = page_text(f"{stack.ui_url}/deployments?page={page}", tmp_path / "profile",
                         [f"{len(wanted)} Deployments", f"Page {page} of"])
        seen += text
        last = re.search(r"Page (\d+) of (\d+)", text)
        assert last is not None
        if int(last.group(1)) >= int(last.group(2)):
            break
        page += 1
    missing = [name for name, shown in wanted.items() if shown not in seen]
    assert not missing, f"deployments not in the UI: {missing}"
    assert "Not Ready" not in seen  # the serving process polls for every one of them


def test_the_ui_shows_the_last_incident_report(stack: RunningStack, tmp_path: Path) -> None:
    # an incident: the daemon-crash recovery run by hand on a healthy daemon opens one, finds nothing to
    # restart, closes it and publishes its post-incident report as the markdown artifact incident-<id>
    entrypoints = dict(zip(deployment_names(PROJECT_DIR), (d["entrypoint"] for d in prefect_yaml()["deployments"]),
                           strict=True))
    assert (PROJECT_DIR / entrypoints[RECOVERY].partition(":")[0]).is_file()  # the recovery's flow, where it lives
    run = run_deployment(stack, RECOVERY)
    assert run.state_type.value == "COMPLETED", f"{RECOVERY}: {run.state_name}: {run.state and run.state.message}"
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with api(stack) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    reports = sorted((a for a in artifacts if (a.key or "").startswith("incident-")), key=lambda a: a.created)
    assert reports, f"the recovery published no incident report: {[a.key for a in artifacts]}"
    report = reports[-1]
    number = report.key.removeprefix("incident-")

    listing = page_text(f"{stack.ui_url}/artifacts", tmp_path / "profile", [report.key])
    assert report.key in listing
    latest = page_text(f"{stack.ui_url}/artifacts/key/{report.key}", tmp_path / "profile",
                       [f"incident #{number}", str(report.id)[:8]])
    assert str(report.id)[:8] in latest
    shown = page_text(f"{stack.ui_url}/artifacts/artifact/{report.id}", tmp_path / "profile",
                      [f"Incident Report #{number}"])
    # the markdown is rendered: headings and fields of the runbook's report, not the raw text
    for field in ("Root Cause", "Detection", "Recovery time", "Data loss", "Flow run"):
        assert field in shown, f"{field!r} not in the rendered report"
    assert "**Date:**" not in shown
