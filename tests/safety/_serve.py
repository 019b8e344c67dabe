"""Serve safety + gateway in this process's main thread (it owns SIGHUP, so lists reload in place):
`python tests/safety/_serve.py CONFIG.toml PORT [EXTRA_CAPABILITY_MODULE,...]` (e.g. the crypto
capability, for labels; put before safety)."""

from __future__ import annotations

import sys

import uvicorn

from xcstack.app import create_app
from xcstack.config import load_settings


def main() -> None:
    settings = load_settings(sys.argv[1])
    extra = [m for m in sys.argv[3].split(",") if m] if len(sys.argv) > 3 else []
    app = create_app(settings, capability_modules=[*extra, "xcstack.safety.capability", "xcstack.gateway.capability"])
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                                  access_log=False, lifespan="on")).run()


if __name__ == "__main__":
    main()
