"""Serve the gateway alone in this process (for RSS and kill/restart tests):
`python tests/gateway/_serve.py CONFIG.toml PORT`."""

from __future__ import annotations

import sys

import uvicorn

from xcstack.app import create_app
from xcstack.config import load_settings


def main() -> None:
    settings = load_settings(sys.argv[1])
    app = create_app(settings, capability_modules=["xcstack.gateway.capability"])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
