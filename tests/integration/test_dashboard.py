"""The dashboard in a real headless Chromium, against a real controller and real agents.

The browser is Debian's `chromium` driven by Playwright through `executable_path`: nothing is
downloaded at run time (`.ci/run` installs the package; `playwright install` is never run).
Screenshots of every page are kept in build/test-artifacts/dashboard/ (git-ignored) for a person
to look at after a run.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.main import cli
from edgefleet.protos.v1 import control_pb2
from fleet_harness import AgentProc, ControllerProc, Proc, wait_until
from model_factory import mlp_onnx

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "dashboard"
TELEMETRY = ["--telemetry-interval", "0.3s", "--workload", "golden:40/s"]

# A missing browser fails the suite rather than skipping it: the dashboard is what this tests.
try:
    from playwright import sync_api
except ImportError:
    pytest.fail("playwright is missing: pip install -e '.[dev]' brings it", pytrace=False)
if not Path(CHROMIUM).exists():
    pytest.fail("no chromium: apt-get install chromium (.ci/run does)", pytrace=False)


class Fleet:
    def __init__(self, controller: ControllerProc, agents: list[AgentProc], rollout_id: str, viewer_token: str):
        self.controller = controller
        self.agents = agents
        self.rollout_id = rollout_id
        self.viewer_token = viewer_token
        self.base = f"http://{controller.http_address}"

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(cli, [*args, "--state-dir", str(self.controller.state_dir)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def rollout_state(self) -> str:
        return str(json.loads(self.cli("rollout", "status", self.rollout_id, "--json"))["state"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dashboard")
    procs: list[Proc] = []
    try:
        # Two worker processes (issue 18): every page, its live part and the pause/resume buttons are
        # answered by whichever worker the browser's connection lands on, and the rollout engine runs
        # in the one holding the singleton lease, which may not be that one.
        controller = ControllerProc(tmp, workers=2)
        procs.append(controller)
        controller.start()
        token = controller.create_token(uses=2)
        agents = []
        for i, cls in enumerate(("x86_64-avx2", "arm64-dotprod")):
            agent = AgentProc(tmp, f"a{i}", controller, token, ["--hardware-class", cls, *TELEMETRY])
            procs.append(agent)
            agents.append(agent.start())
        wait_until(lambda: sum(d.online for d in controller.devices()) == 2, 60, "2 agents online")
        fleet = Fleet(controller, agents, "", "")
        model = mlp_onnx(tmp / "mlp.onnx")
        calib = tmp / "calib.npz"
        np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
        fleet.cli("models", "add", str(model), "--name", "mlp", "--version", "1", "--calib", str(calib))
        # A long soak keeps the rollout pausable for the whole module.
        fleet.rollout_id = json.loads(fleet.cli("rollout", "create", "mlp:1", "--waves", "1,100%", "--soak", "300s",
                                                "--gate", "p95_ms<=5x", "--json"))["rollout_id"]
        reply = controller.call("CreateOperatorToken", control_pb2.CreateOperatorTokenRequest(role="viewer",
                                                                                              name="dashboard test"))
        fleet.viewer_token = reply.token
        yield fleet
    finally:
        for proc in reversed(procs):
            proc.stop(timeout_s=5)
            if isinstance(proc, ControllerProc):
                proc.close_channel()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def logged_in(browser: Any, fleet: Fleet, token: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(15_000)
    page.goto(fleet.base + "/login")
    page.fill("input[name=token]", token)
    page.click("#login")
    page.wait_for_url(fleet.base + "/")
    return page


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_login_refuses_a_wrong_token_and_lands_on_the_fleet_page(fleet: Fleet, browser: Any) -> None:
    page = browser.new_page()
    page.goto(fleet.base + "/devices")
    assert page.url == fleet.base + "/login", "an unauthenticated page redirects to the login form"
    page.fill("input[name=token]", "efo_not-a-real-token")
    page.click("#login")
    assert "not valid" in page.inner_text("#login-error")
    shot(page, "login-refused")
    page.fill("input[name=token]", fleet.controller.operator_token)
    page.click("#login")
    page.wait_for_url(fleet.base + "/")
    cookie = next(c for c in page.context.cookies() if c["name"] == "edgefleet_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert fleet.controller.operator_token not in cookie["value"]
    page.click("#logout")
    page.wait_for_url(fleet.base + "/login")
    page.goto(fleet.base + "/")
    assert page.url == fleet.base + "/login", "logging out ended the session"
    page.context.close()
    # Metrics and health stay open to scrapers.
    with urllib.request.urlopen(fleet.base + "/healthz") as reply:
        assert reply.status == 200


def test_every_page_renders_with_a_live_fleet(fleet: Fleet, browser: Any) -> None:
    page = logged_in(browser, fleet, fleet.controller.operator_token)
    device_ids = sorted(a.device_id or "" for a in fleet.agents)
    wait_until(lambda: page.inner_text("#fleet-online").strip() == "2", 20, "fleet shows 2 online")
    assert "x86_64-avx2" in page.inner_text("#live") and fleet.rollout_id in page.inner_text("#live")
    shot(page, "fleet")
    page.goto(fleet.base + "/devices")
    text = page.inner_text("#live")
    assert all(d in text for d in device_ids) and "online" in text
    shot(page, "devices")
    page.goto(fleet.base + "/devices?" + urllib.parse.urlencode({"class": "arm64-dotprod"}))
    filtered = page.inner_text("#live")
    assert "1 devices" in filtered and "arm64-dotprod" in filtered and "x86_64-avx2" not in filtered
    page.goto(fleet.base + f"/devices/{device_ids[0]}")
    page.wait_for_selector(".chart svg")
    body = page.inner_text("main")
    assert "ISA" in body and "Runtimes" in body and "onnxruntime" in body and "source:" in body
    shot(page, "device")
    page.goto(fleet.base + "/models")
    assert "mlp:1" in page.inner_text("main")
    shot(page, "models-compiling")
    page.goto(fleet.base + f"/rollouts/{fleet.rollout_id}")
    assert "Waves" in page.inner_text("main")
    shot(page, "rollout")
    page.context.close()


def test_a_device_p95_changes_on_screen_without_a_reload(fleet: Fleet, browser: Any) -> None:
    page = logged_in(browser, fleet, fleet.controller.operator_token)
    device_id = fleet.agents[0].device_id
    page.goto(fleet.base + f"/devices/{device_id}")
    marker = page.evaluate("() => { window.__noReload = 1; return 1; }")
    assert marker == 1
    p95 = 'b.latest[data-series="p95"]'
    # Each class has one device, so both are canaries: the latency chart appears once this one serves
    # mlp:1 (the live region is swapped in over /events, so this already happens without a reload).
    first = page.wait_for_selector(p95, timeout=90_000).inner_text()
    wait_until(lambda: page.inner_text(p95) != first, 20, "the p95 on screen to change")
    assert page.evaluate("() => window.__noReload") == 1, "the page was not reloaded"
    # The build served is ready by now, with its compile report behind a collapsible.
    page.goto(fleet.base + "/models")
    page.click("details summary")
    report = page.inner_text("details pre")
    assert '"chosen"' in report and '"speedup"' in report
    assert "ready" in page.inner_text("main")
    shot(page, "models")
    page.context.close()


def test_the_pause_button_pauses_the_rollout_and_a_viewer_cannot_press_it(fleet: Fleet, browser: Any) -> None:
    viewer = logged_in(browser, fleet, fleet.viewer_token)
    viewer.goto(fleet.base + f"/rollouts/{fleet.rollout_id}")
    assert viewer.inner_text("#role") == "viewer"
    assert viewer.is_disabled("#btn-pause") and viewer.is_disabled("#btn-abort")
    shot(viewer, "rollout-viewer")
    # A forged POST with the viewer's own session and CSRF token is refused by the server too.
    csrf = viewer.get_attribute("input[name=csrf]", "value")
    cookie = next(c for c in viewer.context.cookies() if c["name"] == "edgefleet_session")
    request = urllib.request.Request(
        fleet.base + f"/rollouts/{fleet.rollout_id}/action",
        data=urllib.parse.urlencode({"csrf": csrf, "action": "pause"}).encode(),
        headers={"Cookie": f"edgefleet_session={cookie['value']}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 403
    viewer.context.close()
    assert fleet.rollout_state() in ("planning", "running")

    operator = logged_in(browser, fleet, fleet.controller.operator_token)
    operator.goto(fleet.base + f"/rollouts/{fleet.rollout_id}")
    # Without the CSRF token the same POST is refused even for an admin.
    operator_cookie = next(c for c in operator.context.cookies() if c["name"] == "edgefleet_session")
    forged = urllib.request.Request(
        fleet.base + f"/rollouts/{fleet.rollout_id}/action", data=b"action=pause",
        headers={"Cookie": f"edgefleet_session={operator_cookie['value']}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as no_csrf:
        urllib.request.urlopen(forged)
    assert no_csrf.value.code == 403
    operator.click("#btn-pause")
    operator.wait_for_selector("#flash")
    assert fleet.rollout_state() == "paused"
    assert operator.inner_text("#rollout-state") == "paused"
    assert operator.is_enabled("#btn-resume") and operator.is_disabled("#btn-pause")
    shot(operator, "rollout-paused")
    operator.click("#btn-resume")
    operator.wait_for_selector("#flash")
    assert fleet.rollout_state() == "running"
    # Both presses and the viewer's refusal are in the audit log, as Control API calls are.
    audit = fleet.cli("audit", "list")
    assert audit.count("ChangeRollout") >= 3 and "PERMISSION_DENIED" in audit
    operator.context.close()


def test_open_event_streams_do_not_hold_up_the_controller_stop(fleet: Fleet) -> None:
    """Last in the module: it stops the controller. Two tabs' worth of /events streams stay open."""
    import http.client
    import signal
    import time

    host, port = fleet.controller.http_address.split(":")
    login = http.client.HTTPConnection(host, int(port), timeout=5)
    login.request("POST", "/login", body=urllib.parse.urlencode({"token": fleet.controller.operator_token}),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    reply = login.getresponse()
    assert reply.status == 303
    session = (reply.getheader("Set-Cookie") or "").split(";")[0]
    assert session.startswith("edgefleet_session=")
    streams = []
    for path in ("/", f"/rollouts/{fleet.rollout_id}"):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", "/events?" + urllib.parse.urlencode({"path": path}), headers={"Cookie": session})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.getheader("Content-Type") == "text/event-stream"
        assert stream.readline().startswith(b"data: ")  # the first render arrives at once
        streams.append(conn)
    started = time.monotonic()
    fleet.controller.signal(signal.SIGTERM)
    code = fleet.controller.wait(15)
    took = time.monotonic() - started
    assert code == 0 and took < 2.0, f"controller took {took:.2f}s to stop with streams open (exit {code})"
    for conn in streams:
        conn.close()
