"""Write docs/configuration.md from the settings models (the single source of truth).

    .venv/bin/python scripts/gen_config_doc.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from xcstack.config import Settings  # noqa: E402

HEAD = """# Configuration

xcstack reads one TOML file (`xcstack --config FILE ...` or `XC_CONFIG=FILE`); every key can be
overridden by an environment variable `XC_<SECTION>__<KEY>` (nested tables join with `__`, lists and
tables are given as JSON: `XC_SERVER__WORKER_CPUS='[2,3]'`). Unknown keys and invalid values stop the
start with the key and the reason. `xcstack config show` prints the effective configuration with
secrets masked. Secret values (URLs with passwords, API keys) are never logged.

This page is generated from the settings models by `scripts/gen_config_doc.py`.
"""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("pydantic.types.", "").replace("pathlib.", "").replace("NoneType", "None")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(table)"
    try:
        return "`" + json.dumps(value, default=str, ensure_ascii=False) + "`"
    except TypeError:
        return f"`{value}`"


def section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        key = f"{prefix}.{name}" if prefix else name
        if sub is not None and "dict" not in str(field.annotation) and "list" not in str(field.annotation):
            nested.append((key, sub))
            continue
        if sub is not None:  # a list or map of tables: documented as its own section
            nested.append((key + ("[]" if "list" in str(field.annotation) else ".<name>"), sub))
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | `{_type_name(field.annotation)}` | {_default(field)} | {desc} |")
    if rows:
        out.append(f"\n## `[{prefix}]`\n" if prefix else "\n## top level\n")
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        if doc and "Usage docs" not in doc:
            out.append(doc.replace("\n", " ") + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
    for key, sub in nested:
        section(sub, key, out)


def main() -> None:
    out = [HEAD]
    section(Settings, "", out)
    (ROOT / "docs" / "configuration.md").write_text("\n".join(out) + "\n")
    print("wrote docs/configuration.md")


if __name__ == "__main__":
    main()
