"""Milvus Lite as a side process: one gRPC server on 127.0.0.1:<lite_port> over <data_dir>/vectors/milvus.db.

Run by the supervisor (`side_processes` in capability.py) when `vector.milvus.lite_mode =
"side_process"`, so several http workers share one Lite database and Lite's Python/faiss work does
not compete with the workers' event loops for a GIL.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("xcstack.vector.lite_server")


def run(settings: Any, index: int = 0) -> None:
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    from xcstack.vector.milvus import lite_path

    v = settings.vector
    path = Path(lite_path(v, settings.data_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    server, db, port = start_server_in_thread(str(path), host="127.0.0.1", port=v.milvus.lite_port)
    log.info("milvus-lite side process serving %s on 127.0.0.1:%d", path, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    db.close()
