"""Settings of the supply capability (the `[supply]` table of the config file, XC_SUPPLY__* env vars).

They drive `xcstack sbom`: who is named as the SBOM's author and the installation's supplier, which
native modules are imported to discover loaded shared libraries, where the offline OSV advisory export
lives, the severity at which an audit fails, and the license policy.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Severity = Literal["low", "medium", "high", "critical"]

# Modules whose native code a running xcstack worker loads; importing them in the SBOM process makes
# their shared libraries show up in /proc/self/maps. Missing ones are skipped.
DEFAULT_NATIVE_MODULES: tuple[str, ...] = (
    "uvloop",
    "orjson",
    "httptools",
    "granian",
    "aiohttp",
    "yarl",
    "multidict",
    "frozenlist",
    "pydantic_core",
    "msgpack",
    "numpy",
    "cryptography.hazmat.bindings._rust",
    "gmssl_pyx",
    "gmalglib.core",
    "xcstack.crypto.primitives.sm2",  # loads the SM2 backend in use (the system libcrypto.so.3 when it is OpenSSL)
    "onnxruntime",
    "tokenizers",
    "sqlite3",
    "ssl",
)

_LICENSE_PATTERN = re.compile(r"^[A-Za-z0-9.+\-*?\[\]]+$")
_VULN_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*-[A-Za-z0-9._:\-]+$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SupplySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    author: str | None = Field(
        None, min_length=1, max_length=200, description="SBOM author (NTIA); default: <user>@<hostname>"
    )
    supplier: str = Field("xcstack project", min_length=1, max_length=200, description="supplier of the installation")
    supplier_url: str | None = Field(None, max_length=500, description="supplier's web address")
    output_dir: Path | None = Field(None, description="where `xcstack sbom` writes; default <data_dir>/sbom")
    include_files: bool = Field(False, description="embed every installed file's SHA-256 (large, slower)")
    native_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NATIVE_MODULES), max_length=200,
        description="modules imported before reading /proc/self/maps",
    )
    os_query_timeout_s: float = Field(30.0, gt=0, le=600, description="limit for dpkg/rpm queries")
    advisories: Path | None = Field(None, description="offline OSV export (dir or zip) used by `sbom --audit`")
    severity_threshold: Severity = Field("high", description="audit fails at or above this severity")
    unknown_severity: Severity = Field("high", description="severity assumed for advisories without a score")
    ignore_vulns: list[str] = Field(default_factory=list, max_length=1000, description="accepted advisory ids")
    license_allow: list[str] = Field(default_factory=list, max_length=1000, description="SPDX ids/globs allowed")
    license_deny: list[str] = Field(default_factory=list, max_length=1000, description="SPDX ids/globs denied")
    unknown_license: Literal["allow", "warn", "deny"] = Field("warn", description="components without a license")

    @field_validator("supplier_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// address")
        return v

    @field_validator("native_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _MODULE.match(name):
                raise ValueError(f"{name!r} is not a module name")
        return v

    @field_validator("license_allow", "license_deny")
    @classmethod
    def _licenses(cls, v: list[str]) -> list[str]:
        for item in v:
            if not _LICENSE_PATTERN.match(item):
                raise ValueError(f"{item!r} is not an SPDX license id or glob (e.g. 'MIT', 'GPL-3.0*')")
            try:
                fnmatch.translate(item)
            except re.error as exc:  # pragma: no cover - translate is permissive
                raise ValueError(f"{item!r}: {exc}") from None
        return v

    @field_validator("ignore_vulns")
    @classmethod
    def _vulns(cls, v: list[str]) -> list[str]:
        for item in v:
            if not _VULN_ID.match(item):
                raise ValueError(f"{item!r} is not an advisory id (e.g. GHSA-xxxx-xxxx-xxxx, CVE-2024-1234)")
        return v
