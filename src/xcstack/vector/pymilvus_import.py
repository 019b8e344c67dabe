"""pymilvus, imported with pyarrow hidden from pandas: `from xcstack.vector.pymilvus_import import ...`.

pymilvus imports pandas at the top of its ORM modules, and pandas imports pyarrow whenever it is
installed: ~70 MB of RSS in every http worker. Neither the MilvusClient calls xcstack makes nor Milvus
Lite use pandas' Arrow side, so the first import of pandas is made to see no pyarrow; pyarrow stays
importable afterwards (Milvus Lite run in this process imports it itself). Nothing is hidden when
pandas or pyarrow is already loaded.
"""

from __future__ import annotations

import sys


def _import_without_arrow() -> None:
    if "pymilvus" in sys.modules or "pandas" in sys.modules or "pyarrow" in sys.modules:
        return
    sys.modules["pyarrow"] = None  # type: ignore[assignment]  # makes `import pyarrow` raise ImportError
    try:
        import pymilvus  # noqa: F401
    except ImportError:  # a pandas that requires pyarrow: forget the partial import, import the ordinary way
        for name in [m for m in sys.modules if m.split(".")[0] in ("pandas", "pymilvus")]:
            del sys.modules[name]
    finally:
        if "pyarrow" in sys.modules and sys.modules["pyarrow"] is None:
            del sys.modules["pyarrow"]


_import_without_arrow()

from pymilvus import DataType, MilvusClient, MilvusException  # noqa: E402

__all__ = ["DataType", "MilvusClient", "MilvusException"]
