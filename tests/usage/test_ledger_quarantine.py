"""A batch the database refuses for its data no longer blocks the ledger: the refused records are
isolated by halving the batch, quarantined (log, metric, `usage_dead_letters`) and the rest written in
order; a failure that is not the data's (a missing table) keeps every record buffered for a retry."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from xcstack.state.store import StateStore
from xcstack.usage.ledger import QUARANTINED, Ledger
from xcstack.usage.periods import Calendar


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


def rec(i: int, group: Any = "g") -> Any:
    return (time.time(), "k", "u", group, "m", "up", "chat", 10, 5, 7, "v", 0, 200, 1.0, str(i))


async def ids(store: StateStore) -> list[int]:
    return [int(r["request_id"]) for r in await store.fetchall("SELECT request_id FROM usage_records ORDER BY id")]


async def test_refused_records_are_isolated_and_quarantined(url: str | None, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(url, tmp_path)
    led = Ledger(store, Calendar("Asia/Shanghai"), batch_max=64)
    await led.migrate()
    bad = {5, 6, 40, 99}  # a NOT NULL column given NULL: refused by the database, every time
    for i in range(100):
        led.enqueue(rec(i, None if i in bad else "g"))
    before = QUARANTINED._value.get()
    with caplog.at_level(logging.ERROR, "xcstack.usage.ledger"):
        assert await led.flush() == 96
    assert led.buf == [] and led.quarantined == 4 and QUARANTINED._value.get() - before == 4
    assert await ids(store) == [i for i in range(100) if i not in bad]  # the rest, in order, once each
    rollup = await store.fetchone("SELECT SUM(requests) AS n FROM usage_daily")
    assert rollup is not None and int(rollup["n"]) == 96  # the roll-ups agree with what was written
    dead = await store.fetchall("SELECT reason, record FROM usage_dead_letters ORDER BY id")
    assert [json.loads(d["record"])[14] for d in dead] == ["5", "6", "40", "99"]
    assert all("IntegrityError" in d["reason"] or "NotNullViolation" in d["reason"] for d in dead), dead
    assert sum("quarantined" in r.message for r in caplog.records) == 4
    # the writer goes on: later records are written
    led.enqueue(rec(100))
    assert await led.flush() == 1
    await store.close()


async def test_a_value_the_database_cannot_hold_is_quarantined(url: str | None, tmp_path: Path) -> None:
    """Out of BIGINT range (both), and a NUL byte in a text column (PostgreSQL refuses it)."""
    store = StateStore(url, tmp_path)
    led = Ledger(store, Calendar("Asia/Shanghai"))
    await led.migrate()
    huge = list(rec(1))
    huge[7] = 2**70
    nul = rec(2, "g\x00x")
    led.enqueue(rec(0))
    led.enqueue(tuple(huge))  # type: ignore[arg-type]
    led.enqueue(nul)
    led.enqueue(rec(3))
    await led.flush()
    written = await ids(store)
    assert 1 not in written and written[0] == 0 and written[-1] == 3
    dead = [json.loads(d["record"])[14] for d in await store.fetchall("SELECT record FROM usage_dead_letters")]
    assert "1" in dead and led.buf == []
    if url is not None:
        assert "2" in dead and 2 not in written
    await store.close()


async def test_a_failure_that_is_not_the_datas_keeps_the_records(url: str | None, tmp_path: Path) -> None:
    store = StateStore(url, tmp_path)
    led = Ledger(store, Calendar("Asia/Shanghai"), batch_max=8)
    await led.migrate()
    await store.execute("ALTER TABLE usage_records RENAME TO usage_records_away")
    for i in range(20):
        led.enqueue(rec(i))
    with pytest.raises(Exception):  # noqa: B017 (the driver's own error: sqlite3 or psycopg)
        await led.flush()
    assert len(led.buf) == 20 and led.quarantined == 0  # nothing quarantined, nothing lost
    await store.execute("ALTER TABLE usage_records_away RENAME TO usage_records")
    assert await led.flush() == 20
    assert await ids(store) == list(range(20))
    await store.close()


async def test_the_running_writer_is_not_blocked_by_a_bad_record(tmp_path: Path) -> None:
    store = StateStore(None, tmp_path)
    led = Ledger(store, Calendar("Asia/Shanghai"), flush_ms=10)
    await led.migrate()
    led.start()
    led.enqueue(rec(0, None))
    led.enqueue(rec(1))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if await ids(store):
            break
    assert await ids(store) == [1] and led.quarantined == 1
    await led.stop()
    await store.close()
