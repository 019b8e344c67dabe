"""One live xcstack (uvicorn in a thread: security, crypto, gateway with the mock upstream, usage, vectors,
DB, content safety, console) and one Chromium for the console's browser tests; the security tests' state
store over SQLite and PostgreSQL (`state`) for the service-level tests."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import free_port
from tests.security.conftest import pg_database, state  # noqa: F401 - fixtures reused by the console tests

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(os.environ.get("XC_CONSOLE_ARTEFACTS") or Path(tempfile.gettempdir()) / "xcstack-console-artefacts")
T = TypeVar("T")
BANNED_WORDS = "# a test list\n禁词甲\nforbidden-word-xyz\n"


@dataclass
class Live:
    base: str
    app: Any
    loop: asyncio.AbstractEventLoop
    mock_port: int
    data_dir: Path

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        """Run a coroutine on the server's loop (the services live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    @property
    def security(self) -> Any:
        return next(c for c in self.app.state.xc.capabilities if c.name == "security")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import uvicorn

    from xcstack.app import create_app
    from xcstack.config import load_settings
    from xcstack.gateway.mock_upstream import MockConfig, serve

    data = tmp_path_factory.mktemp("console")
    (data / "banned.txt").write_text(BANNED_WORDS, encoding="utf-8")
    port, mock_port = free_port(), free_port()
    settings = load_settings(
        None, data_dir=data,
        security={"pbkdf2_iterations": 100_000},
        crypto={"access": "direct"},
        gateway={"upstreams": [{"name": "mock-up", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                                "models": ["mock-model"]}],
                 "breaker": {"failure_threshold": 1, "open_s": 3.0}, "retry": {"max_attempts": 1}},
        console={"poll_s": 0.5},
        # a policy for a model nobody calls here: the secadmin's view has something to show, no test is filtered
        safety={"lists": [{"name": "banned", "path": str(data / "banned.txt"), "category": "prohibited"}],
                "policies": [{"name": "guarded", "models": ["guarded-model"], "input": ["list:banned", "pii:mobile"],
                              "output": ["list:banned"], "action": "block", "actions": {"pii:mobile": "mask"}}]},
        vector={"backend": "milvus", "milvus": {"lite_mode": "in_process"}},
        db={"databases": {"main": {
            "driver": "sqlite", "dsn": str(data / "console.sqlite"), "pool_size": 1,
            "queries": {"greet": {"sql": "SELECT 'hi ' || :who AS greeting, :n * 2 AS twice",
                                  "description": "a greeting", "params": {"who": {"type": "str"},
                                                                          "n": {"type": "int", "max": 100}}}},
        }}},
    )
    modules = ["xcstack.crypto.capability", "xcstack.security.capability", "xcstack.gateway.capability",
               "xcstack.usage.capability", "xcstack.vector.capability", "xcstack.db.capability",
               "xcstack.safety.capability", "xcstack.console.capability"]
    app = create_app(settings, modules)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", loop="asyncio")
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()

    async def main() -> None:
        mock = asyncio.ensure_future(serve("127.0.0.1", mock_port, MockConfig()))
        try:
            await server.serve()
        finally:
            mock.cancel()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the console's server did not start"
        assert thread.is_alive(), "the console's server died at start"
        time.sleep(0.05)
    yield Live(f"http://127.0.0.1:{port}", app, loop, mock_port, data)
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/services/chromium.sh installs it for the tests")
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()
