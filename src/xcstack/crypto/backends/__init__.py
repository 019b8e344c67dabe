"""Key backends: where private keys live and where the operations run (soft, pkcs11, sdf)."""

from __future__ import annotations

from pathlib import Path

from xcstack.crypto.backends.base import Backend, KeyMaterial
from xcstack.crypto.settings import CryptoSettings

__all__ = ["Backend", "KeyMaterial", "open_backend"]


def open_backend(settings: CryptoSettings, data_dir: Path) -> Backend:
    """Open the configured backend. For pkcs11/sdf this opens the device: only the HSM owner (or a
    CLI/bench process when no owner runs) may call it."""
    if settings.backend == "soft":
        from xcstack.crypto.backends.soft import SoftBackend

        return SoftBackend.open(settings, data_dir)
    if settings.backend == "pkcs11":
        from xcstack.crypto.backends.pkcs11 import Pkcs11Backend

        return Pkcs11Backend.open(settings, data_dir)
    from xcstack.crypto.backends.sdf import SdfBackend

    return SdfBackend.open(settings, data_dir)
