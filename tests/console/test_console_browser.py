"""The console in a real browser (Debian's Chromium driven by Playwright): first sign-in of each
administrator, the administrators' jobs, and the attacks a console must withstand.

The tests share one server and one browser (conftest.py) and run in order: the administrators'
signed-in contexts from the first test are reused (a TOTP code is accepted once per 30 s step).
Screenshots of every view go to $XC_CONSOLE_ARTEFACTS (default: <tmp>/xcstack-console-artefacts).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyotp
import pytest

from xcstack.security.service import SYSTEM

from .conftest import ARTEFACTS, Live

ADMINS = ("admin", "secadmin", "auditor")
NEW_PW = {"admin": "Sys-Console-2024!a", "secadmin": "Sec-Console-2024!b", "auditor": "Aud-Console-2024!c"}
USER_PW = "Plain-Console-2024!d"
contexts: dict[str, Any] = {}
render_ms: dict[str, list[float]] = {}
warm: set[int] = set()


def api(live: Live, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(live.base + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def goto(page: Any, live: Live, path: str, shot: str | None = None) -> Any:
    """Open a console page; its first render (navigation start to DOMContentLoaded) must stay < 300 ms."""
    resp = page.goto(live.base + path)
    ms = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                       " return n.domContentLoadedEventEnd - n.startTime; }")
    if id(page) not in warm:  # a new tab's first navigation also pays for Chromium's renderer start
        warm.add(id(page))
        return resp
    render_ms.setdefault(path.split("?")[0], []).append(ms)
    if shot:
        page.screenshot(path=str(ARTEFACTS / f"{shot}.png"), full_page=True)
    return resp


def cookie(ctx: Any) -> str:
    return next(c["value"] for c in ctx.cookies() if c["name"] == "xc_console")


def on_dialog(dialog: Any, seen: list[str]) -> None:
    seen.append(dialog.message)  # an alert() would mean a script ran
    dialog.dismiss()


def sign_in(page: Any, live: Live, user: str, password: str, code: str | None = None) -> None:
    goto(page, live, "/console/login")
    page.fill("#username", user)
    page.fill("#password", password)
    if code:
        page.fill("#totp", code)
    page.click("#sign-in")
    page.wait_for_load_state()


def away_from_a_step_boundary(step_s: int, margin_s: float = 10.0) -> None:
    """Sleep into the next TOTP step when fewer than `margin_s` seconds of this one are left: a previous-step
    code filled just before a boundary is two steps old when the server checks it (seen once in CI)."""
    left = step_s - time.time() % step_s
    if left < margin_s:
        time.sleep(left + 0.05)


def test_first_sign_in_of_each_administrator(live: Live, browser: Any) -> None:
    """One-time password -> new password -> TOTP enrolment (QR shown) -> sign in with TOTP."""
    for user in ADMINS:
        one_time = live.run(live.security.service.reset_password(SYSTEM, user))
        ctx = browser.new_context(locale="zh-CN")
        page = ctx.new_page()
        goto(page, live, "/console/")
        assert page.url.endswith("/console/login")  # no session: the sign-in page
        sign_in(page, live, user, one_time)
        assert page.url.endswith("/console/password"), page.inner_text("main")
        assert "请先修改密码" in page.content()
        if user == "admin":
            page.screenshot(path=str(ARTEFACTS / "password-change.png"))
        page.fill("#old_password", one_time)
        page.fill("#new_password", NEW_PW[user])
        page.fill("#repeat_password", NEW_PW[user])
        page.click("#save-password")
        page.wait_for_load_state()
        assert page.url.endswith("/console/totp"), page.url
        page.click("#totp-start")
        page.wait_for_load_state()
        assert page.get_attribute("#qr", "src").startswith("data:image/svg+xml;base64,")
        if user == "admin":
            page.screenshot(path=str(ARTEFACTS / "totp-enrol.png"))
        secret = page.inner_text("#totp-secret").strip()
        totp = pyotp.TOTP(secret)
        # the previous step's code (the sign-in below uses the current one: a code is accepted once), sent
        # early enough in this step that it is still inside the server's ±1-step window when checked
        away_from_a_step_boundary(totp.interval)
        page.fill("#totp-code", totp.at(time.time() - totp.interval))
        page.click("#totp-confirm")
        page.wait_for_load_state()
        assert page.is_visible("#totp-done"), page.inner_text("main")
        assert len(page.query_selector_all("#recovery li")) >= 5
        page.click("#logout")
        page.wait_for_load_state()
        assert page.url.endswith("/console/login")
        sign_in(page, live, user, NEW_PW[user])  # enrolled: the password alone is not enough
        assert "请输入动态口令" in page.content()
        sign_in(page, live, user, NEW_PW[user], totp.now())
        assert page.url.endswith("/console/"), page.url
        assert page.inner_text("#me") == user
        role = {"admin": "系统管理员", "secadmin": "安全管理员", "auditor": "审计管理员"}[user]
        assert role in page.inner_text("#my-roles")
        goto(page, live, "/console/", f"home-{user}")
        contexts[user] = ctx


def test_sysadmin_creates_a_user_and_a_key_with_a_quota_secadmin_assigns_a_role(live: Live) -> None:
    page = contexts["admin"].pages[0]
    goto(page, live, "/console/users")
    page.fill("#new-user", "zhang.san")
    page.click("#create-user")
    page.wait_for_load_state()
    one_time = page.inner_text("#secret").strip()
    assert len(one_time) >= 12 and page.locator("tr[data-user='zhang.san']").count() == 1
    page.screenshot(path=str(ARTEFACTS / "users-sysadmin.png"), full_page=True)
    goto(page, live, "/console/keys")
    page.fill("#key-name", "team-a")
    page.fill("#key-roles", "sysadmin")
    page.fill("#key-days", "30")
    page.fill("#key-quota", "100000")
    page.click("#create-key")
    page.wait_for_load_state()
    key = page.inner_text("#secret").strip()
    assert key.startswith("xck_") or len(key) > 20, key
    assert "错误" not in page.content()  # the quota was accepted too
    page.screenshot(path=str(ARTEFACTS / "keys.png"), full_page=True)
    assert api(live, "GET", "/v1/models", key)[0] == 200  # the key works
    status, quotas = api(live, "GET", "/v1/quotas", key)
    assert status == 200 and any(q["limit"] == 100000 and q["scope"] == "key" for q in quotas["quotas"]), quotas
    goto(page, live, "/console/keys")  # shown once: not on the list page
    assert key not in page.content()

    sec = contexts["secadmin"].pages[0]
    goto(sec, live, "/console/users")
    assert sec.locator("#create-user").count() == 0  # creating users is the sysadmin's (三权分立)
    row = sec.locator("tr[data-user='zhang.san']")
    row.locator("input[name=roles]").fill("auditor")  # a built-in administrator role: the API refuses
    row.locator("button[data-action=roles]").click()
    sec.wait_for_load_state()
    assert "控制台" in sec.content() or "console" in sec.content()
    assert "forbidden" in sec.inner_text("main")
    goto(sec, live, "/console/roles", "roles-secadmin")
    goto(sec, live, "/console/users", "users-secadmin")


def test_sysadmin_sees_an_upstream_go_down_and_come_back(live: Live) -> None:
    page = contexts["admin"].pages[0]
    goto(page, live, "/console/overview")
    token = cookie(contexts["admin"])
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "你好"}]}
    assert api(live, "POST", "/v1/chat/completions", token, body)[0] == 200
    page.wait_for_selector("#upstreams tr[data-upstream='mock-up'][data-state='closed']", timeout=5000)
    req = urllib.request.Request(f"http://127.0.0.1:{live.mock_port}/mock/config", method="POST",
                                 data=json.dumps({"fault": "500"}).encode())
    urllib.request.urlopen(req, timeout=5).read()
    assert api(live, "POST", "/v1/chat/completions", token, body)[0] >= 500
    page.wait_for_selector("#upstreams tr[data-upstream='mock-up'][data-state='open']", timeout=5000)
    try:
        page.wait_for_selector("#checks tr[data-check='gateway'] td.bad", timeout=5000)
    except Exception:
        raise AssertionError(page.inner_text('#overview')) from None
    page.screenshot(path=str(ARTEFACTS / "overview-upstream-down.png"), full_page=True)
    req = urllib.request.Request(f"http://127.0.0.1:{live.mock_port}/mock/config", method="POST",
                                 data=json.dumps({"fault": ""}).encode())
    urllib.request.urlopen(req, timeout=5).read()
    deadline = time.monotonic() + 10
    while api(live, "POST", "/v1/chat/completions", token, body)[0] != 200:  # the half-open probe closes it
        assert time.monotonic() < deadline
        time.sleep(0.3)
    page.wait_for_selector("#upstreams tr[data-upstream='mock-up'][data-state='closed']", timeout=5000)
    page.wait_for_function("() => Number(document.getElementById('overview').dataset.polled) >= 4")
    page.screenshot(path=str(ARTEFACTS / "overview.png"), full_page=True)
    goto(page, live, "/console/models", "models")
    goto(page, live, "/console/groups", "groups")


def test_sysadmin_sees_the_process_tree_with_its_cores(live: Live, tmp_path: Path) -> None:
    """Without a supervisor the overview lists the process that answered (and says so); with the supervisor's
    table (written here as `xcstack serve` writes it) every process with its cores, pid, state and restarts,
    and a poll shows a side process coming back without reloading the page."""
    from xcstack.system.table import STATUS_ENV, StatusWriter

    page = contexts["admin"].pages[0]
    goto(page, live, "/console/overview")
    me = page.locator("#processes tr[data-proc='http']")
    assert me.get_attribute("class") == "this" and me.locator(".pid").inner_text() == str(os.getpid())
    assert me.locator(".cpus").inner_text() == ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    assert page.locator("#proc-note").count() == 1

    plan = SimpleNamespace(usable_cpus=[0, 1], cpu_budget=2.0, cpu_slots=2, pin=True, http_workers=1,
                           model_workers=1, io_cores=[0], compute_cores=[1], shared_cores=False, event_loop="uvloop",
                           llm_cpus=[1], llm_threads=1, warnings=[])
    writer = StatusWriter(tmp_path / "processes.json", plan)
    now = time.time()
    base = {"threads": None, "restarts": 0, "ready": True, "last_exit": None, "state": "running",
            "started_at": now - 3700}
    rows = [{**base, "role": "http", "kind": "http", "name": "http[0]", "index": 0, "pid": os.getpid(), "cpus": [0]},
            {**base, "role": "side", "kind": "model-worker", "name": "model-worker[0]", "index": 0, "pid": 4242,
             "cpus": [1], "threads": 1},
            {**base, "role": "side", "kind": "llm-worker", "name": "llm-worker[0]", "index": 0, "pid": None,
             "cpus": [1], "threads": 1, "restarts": 2, "ready": False, "last_exit": -9, "state": "restarting"},
            {**base, "role": "side", "kind": "hsm-owner", "name": "hsm-owner[0]", "index": 0, "pid": 4243, "cpus": [],
             "ready": None}]  # no readiness check declared
    writer.publish(rows)
    os.environ[STATUS_ENV] = str(writer.path)
    try:
        goto(page, live, "/console/overview?lang=en")
        assert page.locator("#processes").get_attribute("data-source") == "supervisor"
        assert page.locator("#proc-note").count() == 0
        table = page.locator("#processes tbody")
        cells = {tr.get_attribute("data-proc"): [td.inner_text() for td in tr.locator("td").all()]
                 for tr in table.locator("tr").all()}
        assert list(cells) == ["supervisor", "http[0]", "model-worker[0]", "llm-worker[0]", "hsm-owner[0]"]
        assert cells["supervisor"][1] == str(os.getpid())
        assert cells["model-worker[0]"][1:6] == ["4242", "1", "1", "ready", "0"]
        assert cells["model-worker[0]"][6] in ("1h 1m", "1h 2m")
        assert cells["llm-worker[0]"][1:5] == ["–", "1", "1", "restarting"] and "-9" in cells["llm-worker[0]"][5]
        assert cells["hsm-owner[0]"][2] == "not pinned" and cells["hsm-owner[0]"][4] == "running"
        assert "compute cores 1" in page.inner_text("#proc-summary")
        assert page.locator("#processes tr.this").get_attribute("data-proc") == "http[0]"
        llm = table.locator("tr[data-proc='llm-worker[0]']")
        assert llm.locator(".state").get_attribute("class") == "state bad"
        page.screenshot(path=str(ARTEFACTS / "overview-processes.png"), full_page=True)
        # the llm worker comes back: the page's poll shows it (no reload)
        rows[2].update(pid=4244, state="running", ready=True, started_at=time.time())
        writer.publish(rows)
        page.wait_for_function("() => document.querySelector(\"#processes tr[data-proc='llm-worker[0]'] .pid\")"
                               ".textContent === '4244'", timeout=5000)
        assert llm.locator(".state").inner_text() == "ready"
        assert llm.locator(".restarts").inner_text() == "2 (last exit -9)"
        goto(page, live, "/console/overview?lang=zh-CN")
        assert "模型工作进程" in page.inner_text("#processes") and "运行时长" in page.inner_text("#processes")
    finally:
        del os.environ[STATUS_ENV]
        writer.remove()


def test_sysadmin_vectors_db_jobs_keys_and_playground(live: Live) -> None:
    """Collections (describe, search), a named query run with parameters, a job cancelled, the 国密
    keys, and the playground's three calls, each answer rendered as text."""
    page = contexts["admin"].pages[0]
    dialogs: list[str] = []
    page.on("dialog", lambda d: on_dialog(d, dialogs))
    token = cookie(contexts["admin"])
    assert api(live, "POST", "/v1/vectors/collections", token, {"name": "docs", "dimension": 4})[0] in (200, 201)
    assert api(live, "POST", "/v1/vectors/docs/upsert", token, {
        "ids": ["a", "b", "c"], "vectors": [[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0]],
        "payloads": [{"title": "<script>alert(1)</script>"}, {"title": "乙"}, {"title": "丙"}]})[0] == 200
    goto(page, live, "/console/vectors")
    assert {"vectors", "db", "jobs", "crypto_keys", "playground"} <= set(
        page.eval_on_selector_all("#menu [data-menu]", "els => els.map(e => e.dataset.menu)"))
    page.click("tr[data-collection='docs'] a")
    page.wait_for_load_state()
    assert page.inner_text("#c-dimension") == "4"
    page.fill("#search-vector", "[1, 0, 0, 0]")
    page.fill("#search-top-k", "2")
    page.click("#search")
    page.wait_for_load_state()
    hits = page.eval_on_selector_all("#hits-table tr[data-hit]", "els => els.map(e => e.dataset.hit)")
    assert hits == ["a", "b"], hits
    assert "<script>alert(1)</script>" in page.inner_text("#hits-table")  # the payload as text
    page.screenshot(path=str(ARTEFACTS / "vectors.png"), full_page=True)

    goto(page, live, "/console/db")
    page.click("a[data-query='greet']")
    page.wait_for_load_state()
    page.fill("input[data-param='who']", "世界")
    page.fill("input[data-param='n']", "21")
    page.click("#db-run-button")
    page.wait_for_load_state()
    assert "hi 世界" in page.inner_text("#result-table") and "42" in page.inner_text("#result-table")
    page.screenshot(path=str(ARTEFACTS / "db.png"), full_page=True)
    page.fill("input[data-param='n']", "1000")  # above the parameter's max: the API's 400, shown
    page.click("#db-run-button")
    page.wait_for_load_state()
    assert "invalid_parameter" in page.inner_text("main")

    slow = {"model": "mock-model", "messages": [{"role": "user", "content": "slow"}], "mock": {"ttft_s": 30}}
    status, job = api(live, "POST", "/v1/jobs", token, {"body": slow})
    assert status == 202, job
    goto(page, live, "/console/jobs")
    page.click(f"tr[data-job='{job['id']}'] button[data-action='cancel']")
    page.wait_for_load_state()
    assert page.get_attribute(f"tr[data-job='{job['id']}']", "data-status") == "cancelled"
    assert api(live, "GET", f"/v1/jobs/{job['id']}", token)[1]["status"] == "cancelled"
    page.screenshot(path=str(ARTEFACTS / "jobs.png"), full_page=True)

    for path in ("/console/db", "/console/jobs", "/console/playground"):  # a second visit: best-of-2 render
        goto(page, live, path)
    goto(page, live, "/console/crypto", "crypto")
    goto(page, live, "/console/crypto")
    assert page.locator("#crypto-table tr[data-key]").count() >= 1
    assert "PRIVATE" not in page.content()

    goto(page, live, "/console/playground")
    page.select_option("#play-kind", "chat")
    page.select_option("#play-model", "mock-model")
    page.fill("#play-input", "<script>alert(1)</script> 你好")
    page.click("#play-run")
    page.wait_for_load_state()
    assert page.inner_text("#play-answer").strip()
    page.screenshot(path=str(ARTEFACTS / "playground.png"), full_page=True)
    page.select_option("#play-kind", "embeddings")
    page.click("#play-run")
    page.wait_for_load_state()
    assert int(page.inner_text("#play-dimension")) > 0
    page.select_option("#play-kind", "rerank")
    page.fill("#play-documents", "北京\n上海\n广州")
    page.click("#play-run")
    page.wait_for_load_state()
    assert page.locator("#play-rerank tbody tr").count() == 3
    assert dialogs == []
    sec = contexts["secadmin"].pages[0]
    assert goto(sec, live, "/console/vectors").status == 403  # the sysadmin's pages only


def test_secadmin_sees_locked_accounts_unlocks_one_and_the_secrets_names_only(live: Live) -> None:
    live.run(live.security.service.create_user(SYSTEM, "wang.wu", [], kind="service", password=USER_PW))
    live.run(live.security.secrets.set("upstream-key", b"never-shown-VALUE"))
    for _ in range(5):  # [security] lockout_threshold
        api(live, "POST", "/v1/auth/login", body={"username": "wang.wu", "password": "wrong"})
    status, body = api(live, "POST", "/v1/auth/login", body={"username": "wang.wu", "password": USER_PW})
    assert status == 429 and body["error"]["code"] == "account_locked"
    sec = contexts["secadmin"].pages[0]
    goto(sec, live, "/console/roles")  # a second visit of the roles page: best-of-2 render
    goto(sec, live, "/console/security")
    assert sec.locator("#menu [data-menu='security']").count() == 1
    assert sec.locator("tr[data-secret='upstream-key']").count() == 1 and "never-shown-VALUE" not in sec.content()
    sec.screenshot(path=str(ARTEFACTS / "security.png"), full_page=True)
    sec.click("tr[data-locked='wang.wu'] button[data-action='unlock']")
    sec.wait_for_load_state()
    assert sec.locator("tr[data-locked='wang.wu']").count() == 0
    assert api(live, "POST", "/v1/auth/login", body={"username": "wang.wu", "password": USER_PW})[0] == 200
    admin = contexts["admin"].pages[0]  # not the sysadmin's (三权分立): the page and the API refuse
    assert goto(admin, live, "/console/security").status == 403
    assert api(live, "GET", "/v1/security/lockouts", cookie(contexts["admin"]))[0] == 403


def test_a_user_without_admin_roles_sees_no_admin_menu_and_gets_403_from_the_api(live: Live, browser: Any) -> None:
    live.run(live.security.service.create_user(SYSTEM, "li.si", [], kind="service", password=USER_PW))
    ctx = browser.new_context(locale="en-US")
    page = ctx.new_page()
    sign_in(page, live, "li.si", USER_PW)
    assert page.url.endswith("/console/"), page.url
    assert "Welcome" in page.content()  # English from Accept-Language
    assert page.locator("#menu [data-menu]").count() == 0
    goto(page, live, "/console/usage", "usage")
    goto(page, live, "/console/usage")  # the first visit may pay for the usage ledger's first query
    token = cookie(ctx)
    status, body = api(live, "GET", "/v1/security/users", token)
    assert status == 403 and body["error"]["code"] == "forbidden"
    resp = goto(page, live, "/console/users")
    assert resp.status == 403  # the page itself is refused on the server, not just hidden
    # the cookie is a console credential only: the JSON API does not take it
    req = urllib.request.Request(live.base + "/v1/auth/me", headers={"Cookie": f"xc_console={token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 401
    goto(page, live, "/console/?lang=zh-CN")
    assert "欢迎" in page.content()
    contexts["li.si"] = ctx


def test_attacks_csrf_xss_framing_fixation_logout(live: Live, browser: Any) -> None:
    ctx = contexts["li.si"]
    page = ctx.pages[0]
    token = cookie(ctx)
    # framing refused on every page
    for path in ("/console/", "/console/login"):
        resp = page.request.get(live.base + path)
        assert resp.headers["x-frame-options"] == "DENY"
        csp = resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    # cross-site POST: a page elsewhere submits a form to the console (SameSite=Strict keeps the cookie
    # home, so it arrives without a session); a forged request carrying the cookie lacks the token
    evil = (f"<form id=f method=post action='{live.base}/console/logout'></form>"
            "<script>document.getElementById('f').submit()</script>")
    page.route("http://evil.test/", lambda route: route.fulfill(body=evil, content_type="text/html"))
    page.goto("http://evil.test/")
    page.wait_for_load_state()
    assert api(live, "GET", "/v1/auth/me", token)[0] == 200  # still signed in
    r = page.request.post(live.base + "/console/logout", form={"x": "1"})
    assert r.status == 403 and "CSRF" in r.text()
    csrf = page.goto(live.base + "/console/") and page.get_attribute("meta[name=csrf-token]", "content")
    r = page.request.post(live.base + "/console/logout", form={"csrf": csrf}, headers={"Origin": "http://evil.test"})
    assert r.status == 403
    assert api(live, "GET", "/v1/auth/me", token)[0] == 200
    # XSS: a user name with <script> (a failed sign-in, then the auditor's view) is rendered inert
    dialogs: list[str] = []
    xss = "<script>alert(1)</script>"
    anon = browser.new_context()
    p2 = anon.new_page()
    p2.on("dialog", lambda d: on_dialog(d, dialogs))
    sign_in(p2, live, xss, "wrong-password")
    assert p2.input_value("#username") == xss
    aud = contexts["auditor"].pages[0]
    aud.on("dialog", lambda d: on_dialog(d, dialogs))
    goto(aud, live, "/console/audit?actor=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert xss in aud.inner_text("#audit-table")
    assert dialogs == []
    # session fixation: a cookie planted before sign-in is replaced, and an earlier session ends
    anon.add_cookies([{"name": "xc_console", "value": "xcs_planted-by-attacker", "domain": "127.0.0.1",
                       "path": "/console"}])
    before = token
    sign_in(p2, live, "li.si", USER_PW)
    fresh = cookie(anon)
    assert fresh not in ("xcs_planted-by-attacker", before)
    assert api(live, "GET", "/v1/auth/me", fresh)[0] == 200
    # logout ends the session on the server: its token is refused afterwards
    p2.click("#logout")
    p2.wait_for_load_state()
    assert api(live, "GET", "/v1/auth/me", fresh)[0] == 401
    anon.close()


def test_sysadmin_rotates_a_key_others_may_not(live: Live) -> None:
    """The keys page's Rotate button: a new version (the API answers it, the list shows it), audited;
    the secadmin gets 403, and the security capability's own keys are not rotated through the API."""
    crypto = live.app.state.xc.services.crypto
    live.run(crypto.create_key("app-sig", "sm2"))
    page = contexts["admin"].pages[0]
    goto(page, live, "/console/crypto")
    row = "#crypto-table tr[data-key='app-sig']"
    assert page.inner_text(f"{row} td:nth-child(5)") == "1"
    page.click(f"{row} button[data-action='rotate']")
    page.wait_for_load_state()
    assert page.inner_text(f"{row} td:nth-child(5)") == "2", page.inner_text("main")
    assert page.inner_text("#crypto-key h2") == "app-sig v2"
    page.screenshot(path=str(ARTEFACTS / "crypto-rotated.png"), full_page=True)
    token = cookie(contexts["admin"])
    status, body = api(live, "POST", "/v1/crypto/keys/app-sig/rotate", token)
    assert status == 200 and body["version"] == 3 and body["pem"].startswith("-----BEGIN PUBLIC KEY"), body
    status, body = api(live, "POST", "/v1/crypto/keys/app-sig/rotate", cookie(contexts["secadmin"]))
    assert status == 403 and body["error"]["code"] == "forbidden"
    signing = live.security.settings.signing_key  # reserved to the security capability: read/verify only
    status, body = api(live, "POST", f"/v1/crypto/keys/{signing}/rotate", token)
    assert status == 403 and body["error"]["code"] == "forbidden", body
    status, body = api(live, "POST", "/v1/crypto/keys/no-such-key/rotate", token)
    assert status == 404 and body["error"]["code"] == "key_not_found"
    assert api(live, "GET", "/v1/crypto/keys/app-sig", token)[1]["version"] == 3
    status, recs = api(live, "GET", "/v1/audit/records?action=crypto.rotate&limit=10", cookie(contexts["auditor"]))
    assert status == 200
    done = [(r["actor"], r["resource"], r["outcome"]) for r in recs["records"]]
    assert done[:2] == [("admin", "key:app-sig", "success")] * 2, done
    assert ("admin", "key:no-such-key", "failure") in done


def test_secadmin_reads_the_content_safety_policies_never_the_words(live: Live) -> None:
    import hashlib

    from .conftest import BANNED_WORDS

    sec = contexts["secadmin"].pages[0]
    goto(sec, live, "/console/safety", "safety")
    goto(sec, live, "/console/safety")
    assert sec.locator("#menu [data-menu='safety']").count() == 1
    row = sec.locator("#lists-table tr[data-list='banned']")
    assert row.locator("td.words").inner_text() == "2"
    sha = hashlib.sha256(BANNED_WORDS.encode()).hexdigest()
    assert sha in row.inner_text() and "guarded:input:block" in row.inner_text() and "prohibited" in row.inner_text()
    pol = sec.inner_text("#policies-table tr[data-policy='guarded']")
    assert "list:banned" in pol and "pii:mobile" in pol and "guarded-model" in pol and "mask" in pol
    assert "禁词甲" not in sec.content() and "forbidden-word-xyz" not in sec.content()
    status, body = api(live, "GET", "/v1/safety/policies", cookie(contexts["secadmin"]))
    assert status == 200, body
    assert body["lists"] == [{"name": "banned", "category": "prohibited", "sha256": sha, "words": 2,
                              "actions": ["guarded:input:block", "guarded:output:block"]}]
    assert body["policies"][0]["actions"] == {"pii:mobile": "mask"} and body["label"]["active"] is True
    assert "禁词甲" not in json.dumps(body, ensure_ascii=False)
    admin = contexts["admin"].pages[0]  # the secadmin's (security.policy): not the sysadmin's
    assert goto(admin, live, "/console/safety").status == 403
    assert api(live, "GET", "/v1/safety/policies", cookie(contexts["admin"]))[0] == 403


def test_a_user_issues_and_revokes_own_keys_within_own_roles(live: Live, browser: Any) -> None:
    svc = live.security.service
    live.run(svc.create_role(SYSTEM, "model-reader", [("route:/v1/models", "get")]))
    live.run(svc.create_user(SYSTEM, "zhao.liu", ["model-reader"], kind="service", password=USER_PW))
    ctx = browser.new_context(locale="zh-CN")
    page = ctx.new_page()
    sign_in(page, live, "zhao.liu", USER_PW)
    contexts["zhao.liu"] = ctx
    goto(page, live, "/console/me/keys")
    assert page.input_value("#my-key-roles") == "model-reader"
    page.fill("#my-key-name", "laptop")
    page.fill("#my-key-days", "30")
    page.click("#create-my-key")
    page.wait_for_load_state()
    key = page.inner_text("#secret").strip()
    assert key.startswith("xck_"), page.inner_text("main")
    page.screenshot(path=str(ARTEFACTS / "my-keys.png"), full_page=True)
    assert api(live, "GET", "/v1/models", key)[0] == 200
    me = api(live, "GET", "/v1/auth/me", key)[1]
    assert me["roles"] == ["model-reader"], me
    goto(page, live, "/console/me/keys")  # shown once
    assert key not in page.content() and page.locator("#my-keys-table tr[data-key='laptop']").count() == 1
    token = cookie(ctx)
    # roles the caller lacks, an administrator role, an expiry past the limit: refused with stable codes
    for roles in (["sysadmin"], ["model-reader", "auditor"], ["hasher"]):
        status, body = api(live, "POST", "/v1/security/me/keys", token, {"name": "more", "roles": roles})
        assert status == 403 and body["error"]["code"] == "forbidden", (roles, body)
    status, body = api(live, "POST", "/v1/security/me/keys", token, {"name": "long", "roles": ["model-reader"],
                                                                       "days": 3650})
    assert status == 400 and body["error"]["code"] == "invalid_parameter", body
    page.fill("#my-key-name", "admin-key")
    page.fill("#my-key-roles", "sysadmin")
    page.click("#create-my-key")
    page.wait_for_load_state()
    assert "forbidden" in page.inner_text("main") and page.locator("#secret").count() == 0
    # someone else's key: not found, and it keeps working; the list holds only the caller's own
    status, all_keys = api(live, "GET", "/v1/security/keys", cookie(contexts["admin"]))
    other = next(k for k in all_keys["keys"] if k["name"] == "team-a")
    status, body = api(live, "DELETE", f"/v1/security/me/keys/{other['id']}", token)
    assert status == 404 and body["error"]["code"] == "apikey_not_found", body
    assert not next(k for k in api(live, "GET", "/v1/security/keys", cookie(contexts["admin"]))[1]["keys"]
                    if k["id"] == other["id"])["revoked"]
    mine = api(live, "GET", "/v1/security/me/keys", token)[1]["keys"]
    assert [k["name"] for k in mine] == ["laptop"]
    page.click("#my-keys-table tr[data-key='laptop'] button[data-action='revoke']")
    page.wait_for_load_state()
    assert page.locator("#my-keys-table tr[data-key='laptop'] button").count() == 0
    assert api(live, "GET", "/v1/auth/me", key)[0] == 401  # revoked at once
    goto(page, live, "/console/me/keys")


def test_secadmin_lists_sessions_and_ends_one_at_once(live: Live) -> None:
    from xcstack.security.tokens import token_hash

    user_ctx = contexts["zhao.liu"]
    token = cookie(user_ctx)
    assert api(live, "GET", "/v1/auth/me", token)[0] == 200  # the login is now in the worker's cache
    sec = contexts["secadmin"].pages[0]
    goto(sec, live, "/console/security")
    goto(sec, live, "/console/security")
    row = sec.locator("#sessions-table tr[data-user='zhao.liu']")
    assert row.count() == 1 and "127.0.0.1" in row.inner_text()
    assert sec.locator("#sessions-table tr[data-user='secadmin'] .tag").count() == 1  # its own, marked
    assert token not in sec.content() and token_hash(token) not in sec.content()
    sec.screenshot(path=str(ARTEFACTS / "sessions.png"), full_page=True)
    row.locator("button[data-action='end-session']").click()
    sec.wait_for_load_state()
    assert sec.locator("#sessions-table tr[data-user='zhao.liu']").count() == 0
    cache = live.security.service.sessions.cache
    assert cache.get(token_hash(token), time.time(), 1e9) is None  # the cached login went with it
    assert api(live, "GET", "/v1/auth/me", token)[0] == 401
    page = user_ctx.pages[0]
    goto(page, live, "/console/me/keys")
    assert page.url.endswith("/console/login")
    assert api(live, "GET", "/v1/security/sessions", cookie(contexts["admin"]))[0] == 403  # security.policy
    recs = api(live, "GET", "/v1/audit/records?action=session.end&limit=5", cookie(contexts["auditor"]))[1]
    assert [(r["actor"], r["resource"]) for r in recs["records"]] == [("secadmin", "user:zhao.liu")]
    user_ctx.close()
    del contexts["zhao.liu"]


def test_auditor_filters_finds_the_denial_verifies_and_sees_a_tampered_chain(live: Live) -> None:
    page = contexts["auditor"].pages[0]
    goto(page, live, "/console/audit?action=access.denied&actor=li.si", "audit-denials")
    rows = page.locator("#audit-table tr[data-action='access.denied']")
    assert rows.count() >= 1
    assert "security.user" in page.inner_text("#audit-table")  # the forbidden GET /v1/security/users
    rid = page.locator("#audit-table tr[data-action='access.denied'] code").first.inner_text().strip()
    goto(page, live, f"/console/audit?request_id={rid}")
    assert page.locator("#audit-table tr[data-action]").count() >= 1
    page.locator("#audit-table details").first.click()
    csv_resp = page.request.get(live.base + "/console/audit/export?format=csv&action=access.denied")
    assert csv_resp.status == 200 and "access.denied" in csv_resp.text()
    jl = page.request.get(live.base + "/console/audit/export?format=jsonl&actor=li.si")
    assert all(json.loads(x)["actor"] == "li.si" for x in jl.text().splitlines())
    goto(page, live, "/console/audit")
    page.click("#verify")
    page.wait_for_load_state()
    assert page.get_attribute("#verify-result", "data-ok") == "true"
    page.screenshot(path=str(ARTEFACTS / "audit-verify.png"), full_page=True)
    goto(page, live, "/console/audit/chains", "audit-chains")
    # tamper with a record in the middle of a segment: verification reports the break and where
    seg = sorted(Path(live.data_dir, "audit").glob("*/seg-*.log"))[0]
    lines = seg.read_bytes().split(b"\n")
    target = next(i for i, ln in enumerate(lines) if b'"outcome":"denied"' in ln)
    lines[target] = lines[target].replace(b'"outcome":"denied"', b'"outcome":"success"', 1)
    seg.write_bytes(b"\n".join(lines))
    goto(page, live, "/console/audit")
    page.click("#verify")
    page.wait_for_load_state()
    assert page.get_attribute("#verify-result", "data-ok") == "false"
    assert int(page.inner_text(".break-seq")) >= 1
    page.screenshot(path=str(ARTEFACTS / "audit-break.png"), full_page=True)


def test_every_page_rendered_under_300_ms() -> None:
    """Navigation start to DOMContentLoaded, per page: the best of its visits must be < 300 ms (the
    machine running the tests is shared: the worst visit is written out beside it, not asserted)."""
    assert len(render_ms) >= 10, render_ms
    summary = {p: {"best_ms": round(min(v), 1), "worst_ms": round(max(v), 1), "visits": len(v)}
               for p, v in sorted(render_ms.items())}
    (ARTEFACTS / "render-ms.json").write_text(json.dumps(summary, indent=1))
    slow = {p: s for p, s in summary.items() if s["best_ms"] >= 300}
    assert not slow, slow
    for ctx in contexts.values():
        ctx.close()
