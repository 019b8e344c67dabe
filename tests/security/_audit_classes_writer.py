"""Child process for the durability-class crash test: security events (awaited, durable) and
data-plane call records (queued, not awaited) from concurrent writers. Prints what it was promised:

    ACK <id>          a security event's `await append()` returned (durable)
    DP <id> <t>       a data-plane record was queued at time.monotonic() == t (durable by t + window)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from xcstack.security.audit.log import AuditLog
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer


async def main(root: str, priv: str, pub: str, tag: str, window_ms: str) -> None:
    signer = SoftSM2Signer("crash-sm2", bytes.fromhex(priv), bytes.fromhex(pub))
    settings = AuditSettings(checkpoint_interval_s=0.05, checkpoint_every_records=200,
                             data_plane_flush_ms=float(window_ms))
    log = AuditLog(Path(root), settings, chain="classes", signer=signer)
    await log.open()
    out = sys.stdout
    out.write(f"READY {log.chain}\n")
    out.flush()

    async def security(w: int) -> None:
        i = 0
        while True:
            rid = f"{tag}-s{w}-{i}"
            await log.append(actor=f"s{w}", action="auth.login", resource="user:x", outcome="success",
                             request_id=rid)
            out.write(f"ACK {rid}\n")
            out.flush()
            i += 1
            await asyncio.sleep(0.002)

    async def data_plane(w: int) -> None:
        i = 0
        while True:
            rid = f"{tag}-d{w}-{i}"
            await log.append_call(actor=f"d{w}", action="api.call", resource="route:/v1/chat/completions",
                                  outcome="success", request_id=rid, detail={"method": "POST", "status": 200})
            out.write(f"DP {rid} {time.monotonic():.6f}\n")
            out.flush()
            i += 1
            await asyncio.sleep(0.0005)

    await asyncio.gather(*[security(w) for w in range(2)], *[data_plane(w) for w in range(8)])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
