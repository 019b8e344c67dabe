"""Serve the gateway alone in this process (for RSS, kill/restart and server-compat tests):
`python tests/gateway/_serve.py CONFIG.toml PORT [uvicorn|granian]`."""

from __future__ import annotations

import socket
import sys

from xcstack.app import create_app
from xcstack.config import load_settings


def main() -> None:
    settings = load_settings(sys.argv[1])
    server = sys.argv[3] if len(sys.argv) > 3 else "uvicorn"
    app = create_app(settings, capability_modules=["xcstack.gateway.capability"])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[2])))
    sock.listen(4096)
    sock.set_inheritable(True)
    if server == "granian":
        from xcstack.worker import run_granian

        run_granian(settings, sock, app)
    else:
        from xcstack.worker import run_uvicorn

        run_uvicorn(settings, sock, app)


if __name__ == "__main__":
    main()
