"""The document is usable by generated clients: openapi-python-client generates a Python client from
the app's own /openapi.json, and that client signs in and calls three endpoints. Also: /docs renders
the reference in a real browser (Debian's Chromium, driven by Playwright), with no network."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.testclient import TestClient

from tests.conftest import free_port
from tests.contract.test_openapi import full_settings
from xcstack.app import create_app

PW = "Generated-Client-Pass-1!"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from xcstack.security.service import SYSTEM

    app = create_app(full_settings(tmp_path_factory.mktemp("gen")))
    with TestClient(app) as c:
        svc = next(cap for cap in app.state.xc.capabilities if cap.name == "security").service

        async def setup() -> None:
            await svc.create_user(SYSTEM, "gen-op", ["sysadmin"], kind="service", password=PW)

        assert c.portal is not None
        c.portal.call(setup)
        yield c


def _generate(c: TestClient, out: Path) -> Any:
    spec = out / "openapi.json"
    spec.write_bytes(c.get("/openapi.json").content)
    exe = Path(sys.executable).with_name("openapi-python-client")
    env = {"PATH": f"{exe.parent}:/usr/bin:/bin"}  # its post-generation hooks run ruff from the venv
    done = subprocess.run([str(exe), "generate", "--path", str(spec), "--meta", "none",
                           "--output-path", str(out / "xc_generated")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("xc_generated")
    finally:
        sys.path.remove(str(out))


def test_generated_python_client_calls_three_endpoints(client: TestClient, tmp_path: Path) -> None:
    pkg = _generate(client, tmp_path)
    from xc_generated.api.auth import get_v1_auth_me, post_v1_auth_login  # type: ignore[import-not-found]
    from xc_generated.api.core import get_healthz  # type: ignore[import-not-found]
    from xc_generated.api.crypto import post_v1_crypto_hash  # type: ignore[import-not-found]
    from xc_generated.models import HashRequest, LoginRequest  # type: ignore[import-not-found]

    gen = pkg.Client(base_url="http://testserver", raise_on_unexpected_status=True)
    gen.set_httpx_client(client)  # the generated code drives the app through the test client's transport
    health = get_healthz.sync_detailed(client=gen)
    assert health.status_code == 200 and health.parsed is not None

    login = post_v1_auth_login.sync(client=gen, body=LoginRequest(username="gen-op", password=PW))
    assert login is not None and login.token.startswith("xcs_")  # typed: the response model was generated
    client.headers["Authorization"] = f"Bearer {login.token}"
    try:
        me = get_v1_auth_me.sync(client=gen)
        assert me is not None and me.name == "gen-op"
        digest = post_v1_crypto_hash.sync(client=gen, body=HashRequest(text="abc"))
        assert digest is not None  # SM3("abc"), GB/T 32905 test vector
        assert digest.digest == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        refused = post_v1_auth_login.sync_detailed(client=gen, body=LoginRequest(username="gen-op", password="x"))
        assert refused.status_code == 401 and refused.parsed is not None  # the error model, typed
    finally:
        client.headers.pop("Authorization", None)


def test_docs_page_renders_the_reference_in_chromium(client: TestClient) -> None:
    """Swagger UI from the local assets draws the operations of the document; nothing is fetched
    from anywhere but the app (other hosts are blocked), and the CSP raises no violation."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/services/chromium.sh installs it for the tests")
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_up(port)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            outside: list[str] = []
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                f"http://127.0.0.1:{port}/") else (outside.append(route.request.url), route.abort()))
            page.goto(f"http://127.0.0.1:{port}/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            title = page.locator(".info .title").inner_text()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert "xcstack" in title
    assert any("/v1/chat/completions" in p for p in paths) and any("/v1/auth/login" in p for p in paths)
    assert len(paths) >= 60
    assert outside == [], f"the page reached outside the app: {outside}"
    assert not [p for p in problems if "Content Security Policy" in p], problems


def _wait_up(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("server did not start")
