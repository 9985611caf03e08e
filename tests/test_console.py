"""The governance console in a real headless Chromium (Debian's, driven by Playwright): sign
in with a token, a wrong role refused with the API's message, a second person approves, the
traffic page follows a weight change live, the approval appears in the audit trail, and the
evidence export downloads. Screenshots are kept in ``test-artifacts/console/``."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browser import artifact_dir, chromium_executable
from conftest import write_model
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate_process import LockgateProcess

TOKENS = "alice:admin:tok-alice-1,bob:approver:tok-bob-2,olga:operator:tok-olga-3,vic:viewer:tok-vic-4"
CONFIG = "max_batch_size: 16\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
WIDTH = 6
TIMEOUT_MS = 30_000


def admin(server: LockgateProcess, method: str, body: dict, token: str) -> dict:
    status, answer = server.post(f"/admin/v1/{method}", body, token)
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("console") / "models"
    for version in (1, 2):
        write_model(repo, "gate", version, mlp_model([WIDTH, 16, 3], seed=version, input_name="INPUT0",
                                                     output_name="OUTPUT0"), CONFIG)
    with LockgateProcess(repo, gated=True, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        sample = json.dumps({"INPUT0": [[0.0] * WIDTH]})
        for version in ("1", "2"):
            assert admin(proc, "ValidateVersion", {"model": "gate", "version": version, "sample_json": sample},
                         "tok-alice-1")["passed"]
            admin(proc, "SetModelCard", {"model": "gate", "version": version, "card_json": json.dumps(DEMO_CARD)},
                  "tok-alice-1")
        admin(proc, "ApproveVersion", {"model": "gate", "version": "1", "reason": "baseline"}, "tok-bob-2")
        admin(proc, "SetWeights", {"model": "gate", "weights": {"1": 100}}, "tok-olga-3")
        yield proc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield instance
        instance.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(base_url=f"http://{server.http_url}", accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def sign_in(page, token: str) -> None:
    page.goto("/console/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/console/models$"))


def shot(page, name: str) -> Path:
    path = artifact_dir("console") / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_sign_in_session_cookie_and_wrong_token(page, server) -> None:
    page.goto("/console/models")
    assert page.url.endswith("/console/login")  # no session: sent to sign in
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "invalid bearer token"
    shot(page, "01-sign-in-refused")
    sign_in(page, "tok-vic-4")
    assert page.locator("#who").inner_text() == "vic"
    assert "tok-vic-4" not in page.url
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "lockgate_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert "tok-" not in cookie["value"]
    rows = page.locator("table").first.locator("tbody tr")
    assert rows.count() == 2 and "serving" in rows.nth(0).inner_text() and "validated" in rows.nth(1).inner_text()
    shot(page, "02-models")


def test_wrong_role_sees_the_apis_refusal(page, server) -> None:
    sign_in(page, "tok-vic-4")
    page.goto("/console/models/gate/versions/2")
    page.get_by_label("Reason (recorded in the audit trail)").fill("looks fine to me")
    page.get_by_role("button", name="Approve version 2").click()
    alert = page.locator("#error")
    alert.wait_for()
    assert alert.inner_text() == "'vic' has role viewer, which lacks the 'approve' permission"
    assert page.locator("#state").inner_text() == "validated"
    shot(page, "03-viewer-refused")


def test_four_eyes_holds_in_the_console(page, server) -> None:
    """alice validated version 2 and wrote its card: the console refuses her approval and her
    rejection with the admin API's four-eyes message (system:lockgate registered it)."""
    sign_in(page, "tok-alice-1")
    for button in ("Approve version 2", "Reject version 2"):
        page.goto("/console/models/gate/versions/2")
        page.get_by_label("Reason (recorded in the audit trail)").fill("I checked it myself")
        page.get_by_role("button", name=button).click()
        alert = page.locator("#error")
        alert.wait_for()
        assert "four-eyes rule" in alert.inner_text() and "'alice' validated it and wrote its card" in alert.inner_text()
        assert page.locator("#state").inner_text() == "validated"
    shot(page, "03b-four-eyes-refused")


def test_second_person_approves_weights_change_live_and_audit_shows_it(page, server) -> None:
    sign_in(page, "tok-bob-2")
    page.get_by_role("link", name="Pending approvals").click()
    page.get_by_role("link", name="Review gate version 2").click()
    page.get_by_label("Reason (recorded in the audit trail)").fill("reviewed card and validation: fit for 50% traffic")
    page.get_by_role("button", name="Approve version 2").click()
    page.locator("#done").wait_for()
    assert page.locator("#state").inner_text() == "approved"
    shot(page, "04-approved-by-second-person")

    # the traffic page follows a change made elsewhere (an operator), without a reload
    page.goto("/console/traffic/gate")
    weight_of = lambda v: page.locator(f'#weights tr[data-version="{v}"] .weight')  # noqa: E731
    assert weight_of("1").inner_text() == "100"
    url_before = page.url
    admin(server, "SetWeights", {"model": "gate", "weights": {"1": 50, "2": 50}}, "tok-olga-3")
    page.wait_for_function("""() => {
        const cell = document.querySelector('#weights tr[data-version="2"] .weight');
        return cell !== null && cell.textContent === "50";
    }""", timeout=TIMEOUT_MS)
    assert weight_of("1").inner_text() == "50" and page.url == url_before
    shot(page, "05-weights-changed-live")

    # the approval and the weight change are in the audit trail, and the chain verifies
    page.get_by_role("link", name="Audit trail").click()
    page.get_by_label("Model").fill("gate")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"model=gate"))
    rows = page.locator("#audit tbody tr")
    actions = [(rows.nth(i).locator(".actor").inner_text(), rows.nth(i).locator(".action").inner_text())
               for i in range(rows.count())]
    assert ("bob", "model.approve") in actions and ("olga", "traffic.set") in actions, actions
    verified = page.locator("#verify").inner_text()
    assert verified.startswith("Chain verified") and "against the signed checkpoint at seq" in verified, verified
    assert "the registry agrees with the trail" in verified
    page.get_by_label("Action contains").fill("approve")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"action=approve"))
    assert {page.locator("#audit tbody tr .action").nth(i).inner_text() for i in range(rows.count())} == {"model.approve"}
    shot(page, "06-audit-trail")
    with page.expect_download() as download_info:
        page.locator("#export").click()
    bundle = json.loads(Path(download_info.value.path()).read_text())
    assert bundle["model"] == "gate" and any(a["actor"] == "bob" and a["version"] == "2" for a in bundle["approvals"])


def test_operator_sets_weights_in_the_console_and_approver_may_not(page, server) -> None:
    sign_in(page, "tok-bob-2")
    page.goto("/console/traffic/gate")
    page.get_by_label("Version 1 (", exact=False).fill("90")
    page.get_by_label("Version 2 (", exact=False).fill("10")
    page.get_by_role("button", name="Set weights").click()
    assert page.locator("#error").inner_text() == "'bob' has role approver, which lacks the 'traffic' permission"
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, "tok-olga-3")
    page.goto("/console/traffic/gate")
    page.get_by_label("Version 1 (", exact=False).fill("90")
    page.get_by_label("Version 2 (", exact=False).fill("10")
    page.get_by_role("button", name="Set weights").click()
    page.wait_for_url(re.compile(r"done=weights"))
    assert page.locator('#weights tr[data-version="2"] .weight').inner_text() == "10"
    shot(page, "07-operator-set-weights")


def test_pages_are_accessible(page, server) -> None:
    """One h1 per page, a language, every visible form field labelled, a skip link first."""
    sign_in(page, "tok-vic-4")
    for path in ("/console/models", "/console/models/gate/versions/2", "/console/approvals",
                 "/console/traffic/gate", "/console/drift/gate", "/console/audit?model=gate"):
        page.goto(path)
        assert page.locator("h1").count() == 1, path
        assert page.locator("html").get_attribute("lang") == "en"
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
            .filter(el => el.type !== 'hidden' && !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
            .map(el => el.name)""")
        assert unlabelled == [], (path, unlabelled)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content", path


def test_forms_need_the_csrf_token_and_a_same_origin(server) -> None:
    cookie, csrf = server.console_session("tok-bob-2")
    url = f"http://{server.http_url}/console/models/gate/versions/2/decision"
    for form, headers in ((({"action": "reject", "reason": "x", "csrf": "forged"}), {}),
                          (({"action": "reject", "reason": "x"}), {}),
                          (({"action": "reject", "reason": "x", "csrf": csrf}), {"Origin": "http://evil.example"})):
        request = urllib.request.Request(url, method="POST", data=urllib.parse.urlencode(form).encode(),
                                         headers={"Cookie": cookie, **headers})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403 and "CSRF" in refused.value.read().decode()
    # a forged or missing session is no session at all
    bad = urllib.request.Request(f"http://{server.http_url}/console/api/traffic/gate", headers={"Cookie": cookie[:-3] + "xyz"})
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(bad, timeout=30)
    assert unsigned.value.code == 401
    assert "tok-bob-2" not in server.log() and "tok-vic-4" not in server.log()
