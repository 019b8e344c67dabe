"""Schema validation of the documents before they are written.

CycloneDX: cyclonedx-python-lib's *strict* CycloneDX 1.6 JSON schema (JsonStrictValidator, with its SPDX
license and JSF sub-schemas), evaluated by jsonschema. Two checks of the stock set-up are replaced by
equivalent, faster ones, because they dominate the time (measured: 8 s of 8.1 s for a 133-component
document was spent in them):

- `iri-reference` / `iri` formats: jsonschema checks them with rfc3987-syntax, an Earley parser that
  costs ~0.1 s per address. We map the IRI to a URI per RFC 3987 §3.1 (percent-encode every non-ASCII
  character as UTF-8) and check the result with rfc3986-validator's RFC 3986 grammar (a regex);
- `uniqueItems`: jsonschema compares items pairwise (quadratic); we compare canonical JSON forms in
  a set (linear). Canonical form: sorted keys, integral floats as ints, so `1 == 1.0` as in JSON
  Schema; `true` and `1` stay distinct.

jsonschema is imported without rfc3987-syntax (whose import alone compiles 38 grammars, 1.5-3.5 s here).
If the library's internals change, the stock validator is used (slower; without rfc3987-syntax loaded it
skips the IRI format checks).

SPDX: spdx-tools' full document validation (`validate_full_spdx_document`).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from xcstack.supply.errors import SbomValidationError


def _iri_to_uri(value: str) -> str:
    if value.isascii():
        return value
    return "".join(c if ord(c) < 128 else quote(c, safe="") for c in value)


def _check_iri_reference(instance: object) -> bool:
    from rfc3986_validator import validate_rfc3986

    if not isinstance(instance, str):
        return True
    return bool(validate_rfc3986(_iri_to_uri(instance), rule="URI_reference"))


def _check_iri(instance: object) -> bool:
    from rfc3986_validator import validate_rfc3986

    if not isinstance(instance, str):
        return True
    return bool(validate_rfc3986(_iri_to_uri(instance), rule="URI"))


def _canon(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


def _unique(items: list[Any]) -> bool:
    seen: set[str] = set()
    for item in items:
        key = json.dumps(_canon(item), sort_keys=True, separators=(",", ":"))
        # keep bool and number apart (json would print True as true, 1 as 1: already distinct)
        if key in seen:
            return False
        seen.add(key)
    return True


def _unique_items(validator: Any, ui: Any, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if ui and validator.is_type(instance, "array") and not _unique(instance):
        yield ValidationError(f"array of {len(instance)} items has non-unique elements")


def _import_jsonschema() -> None:
    """Import jsonschema without rfc3987-syntax: its import compiles 38 lark grammars (1.5-3.5 s measured
    here) only to provide the `iri`/`iri-reference` checkers that we replace anyway."""
    if "jsonschema" in sys.modules or "rfc3987_syntax" in sys.modules:
        return
    sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # makes its import fail fast
    try:
        import jsonschema  # noqa: F401
    finally:
        del sys.modules["rfc3987_syntax"]


@functools.lru_cache(maxsize=1)
def _cyclonedx_validator() -> Any:
    _import_jsonschema()
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    stock = JsonStrictValidator(SchemaVersion.V1_6)
    try:
        from jsonschema import FormatChecker
        from jsonschema.validators import Draft7Validator, extend

        inner = stock._validator
        checker = FormatChecker(formats=())
        checker.checkers = dict(Draft7Validator.FORMAT_CHECKER.checkers)
        checker.checkers["iri-reference"] = (_check_iri_reference, ValueError)
        checker.checkers["iri"] = (_check_iri, ValueError)
        fast_cls = extend(Draft7Validator, {"uniqueItems": _unique_items})
        return fast_cls(inner.schema, registry=inner._registry, format_checker=checker)
    except Exception:  # library internals moved: use the stock validator
        return stock


def validate_cyclonedx(document: dict[str, Any] | str, *, fast: bool = True) -> None:
    """Raise SbomValidationError unless `document` is valid CycloneDX 1.6 JSON (strict schema)."""
    if isinstance(document, str):
        data = json.loads(document)
    else:
        data = document
    if not fast:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator

        err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(data))
        if err is not None:
            raise SbomValidationError(f"CycloneDX 1.6 schema: {err}")
        return
    validator = _cyclonedx_validator()
    if hasattr(validator, "iter_errors"):
        errors = []
        for e in validator.iter_errors(data):
            where = "/".join(str(p) for p in e.absolute_path) or "<root>"
            errors.append(f"{where}: {e.message[:300]}")
            if len(errors) >= 10:
                break
        if errors:
            raise SbomValidationError("CycloneDX 1.6 schema: " + "; ".join(errors))
        return
    err = validator.validate_str(json.dumps(data))
    if err is not None:
        raise SbomValidationError(f"CycloneDX 1.6 schema: {err}")


def validate_spdx(document: Any) -> None:
    """Raise SbomValidationError unless the spdx-tools `Document` passes full SPDX 2.3 validation."""
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    messages = validate_full_spdx_document(document, "SPDX-2.3")
    if messages:
        text = "; ".join(f"{m.validation_message}" for m in messages[:10])
        raise SbomValidationError(f"SPDX 2.3: {len(messages)} problem(s): {text}")
