"""Child process of the crash test: enqueues ledger records as fast as it can (request ids are sequence
numbers) and prints `seq dropped monotonic_time` after each 1000, until it is killed."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from xcstack.state.store import StateStore
from xcstack.usage.ledger import Ledger
from xcstack.usage.periods import Calendar


async def main(url: str | None, data: str) -> None:
    store = StateStore(url, Path(data))
    led = Ledger(store, Calendar("Asia/Shanghai"), flush_ms=100, batch_max=2000, queue_max=50_000)
    await led.migrate()
    led.start()
    seq = 0
    print("ready", flush=True)
    while True:
        for _ in range(1000):
            seq += 1
            led.enqueue((time.time(), "k", "u", "g", "m", "up", "chat", 10, 5, 0, "v", 0, 200, 1.0, str(seq)))
        print(seq, led.dropped, time.monotonic(), flush=True)
        await asyncio.sleep(0.002)  # ~500k records/s offered at most: the writer keeps up or the bound shows


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] or None, sys.argv[2]))
