"""Child process for the crash-consistency test: concurrent appends, printing each acknowledgement."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from xcstack.security.audit.log import AuditLog
from xcstack.security.settings import AuditSettings
from xcstack.security.signing import SoftSM2Signer


async def main(root: str, priv: str, pub: str, tag: str, chain: str = "crash") -> None:
    signer = SoftSM2Signer("crash-sm2", bytes.fromhex(priv), bytes.fromhex(pub))
    log = AuditLog(Path(root), AuditSettings(checkpoint_interval_s=0.05, checkpoint_every_records=50),
                   chain=None if chain == "auto" else chain, signer=signer)
    await log.open()
    out = sys.stdout
    out.write(f"READY {log.chain}\n")
    out.flush()

    async def writer(w: int) -> None:
        i = 0
        while True:
            rid = f"{tag}-{w}-{i}"
            await log.append(actor=f"w{w}", action="api.call", resource="/crash", outcome="success", request_id=rid)
            out.write(f"ACK {rid}\n")
            out.flush()
            i += 1

    await asyncio.gather(*[writer(w) for w in range(16)])


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
