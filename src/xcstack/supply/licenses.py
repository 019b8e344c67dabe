"""License facts from package metadata, normalised to SPDX, and the allow/deny policy check.

A distribution declares its license in one of three places, best first: `License-Expression`
(PEP 639, an SPDX expression), the `License` field (free text: an SPDX id, a name such as "BSD", or a
whole license text), or trove classifiers (`License :: OSI Approved :: MIT License`). `normalise`
returns an SPDX expression when one can be derived honestly, else the free-text name.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from license_expression import (
    AND,
    OR,
    ExpressionError,
    LicenseSymbol,
    LicenseWithExceptionSymbol,
    Licensing,
    get_spdx_licensing,
)

# Trove classifier (after "License :: ") -> SPDX id. Only unambiguous ones; "BSD License" is not.
CLASSIFIERS: dict[str, str] = {
    "OSI Approved :: MIT License": "MIT",
    "OSI Approved :: MIT No Attribution License (MIT-0)": "MIT-0",
    "OSI Approved :: Apache Software License": "Apache-2.0",
    "OSI Approved :: ISC License (ISCL)": "ISC",
    "OSI Approved :: Python Software Foundation License": "PSF-2.0",
    "OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "OSI Approved :: GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "OSI Approved :: GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "OSI Approved :: GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "OSI Approved :: GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
    "OSI Approved :: GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0-only",
    "OSI Approved :: GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "OSI Approved :: GNU Lesser General Public License v3 or later (LGPLv3+)": "LGPL-3.0-or-later",
    "OSI Approved :: GNU Affero General Public License v3": "AGPL-3.0-only",
    "OSI Approved :: GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later",
    "OSI Approved :: Eclipse Public License 2.0 (EPL-2.0)": "EPL-2.0",
    "OSI Approved :: The Unlicense (Unlicense)": "Unlicense",
    "OSI Approved :: Zope Public License": "ZPL-2.1",
    "OSI Approved :: Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "OSI Approved :: Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "OSI Approved :: Universal Permissive License (UPL)": "UPL-1.0",
    "OSI Approved :: zlib/libpng License": "Zlib",
    "OSI Approved :: Academic Free License (AFL)": "AFL-3.0",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
    "Public Domain": "LicenseRef-Public-Domain",
}

# Common free-text `License:` values -> SPDX id.
ALIASES: dict[str, str] = {
    "mit": "MIT",
    "mit license": "MIT",
    "the mit license": "MIT",
    "expat": "MIT",
    "apache 2.0": "Apache-2.0",
    "apache-2": "Apache-2.0",
    "apache 2": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0",
    "apache software license 2.0": "Apache-2.0",
    "asl 2": "Apache-2.0",
    "new bsd": "BSD-3-Clause",
    "new bsd license": "BSD-3-Clause",
    "modified bsd": "BSD-3-Clause",
    "3-clause bsd": "BSD-3-Clause",
    "3-clause bsd license": "BSD-3-Clause",
    "bsd 3-clause": "BSD-3-Clause",
    "bsd-3": "BSD-3-Clause",
    "simplified bsd": "BSD-2-Clause",
    "2-clause bsd": "BSD-2-Clause",
    "psf": "PSF-2.0",
    "psfl": "PSF-2.0",
    "python software foundation license": "PSF-2.0",
    "mpl 2.0": "MPL-2.0",
    "mpl-2": "MPL-2.0",
    "lgpl": "LGPL-2.1-or-later",
    "gplv2": "GPL-2.0-only",
    "gplv3": "GPL-3.0-only",
    "isc license": "ISC",
    "public domain": "LicenseRef-Public-Domain",
}

_LICENSEREF = re.compile(r"^LicenseRef-[A-Za-z0-9.\-]+$")


@functools.lru_cache(maxsize=1)
def licensing() -> Licensing:
    return get_spdx_licensing()


@dataclass(frozen=True)
class LicenseInfo:
    expression: str | None  # a valid SPDX expression, when one could be derived
    name: str | None  # free text when no SPDX expression could be derived
    source: str  # "License-Expression" | "License" | "classifier" | "file" | "dpkg" | "none"

    @property
    def known(self) -> bool:
        return bool(self.expression or self.name)

    def display(self) -> str:
        return self.expression or self.name or "NOASSERTION"


def spdx_expression(text: str) -> str | None:
    """A canonical SPDX expression for `text`, or None if it is not one (unknown ids are rejected)."""
    text = text.strip()
    if not text or len(text) > 500 or "\n" in text:
        return None
    alias = ALIASES.get(text.lower())
    if alias:
        return alias
    if _LICENSEREF.match(text):
        return text
    try:
        info = licensing().validate(text, strict=False)
    except Exception:  # license-expression raises AttributeError on some malformed input
        return None
    if info.errors or not info.normalized_expression:
        return None
    return str(info.normalized_expression)


def normalise(metadata: Any) -> LicenseInfo:
    """License of a distribution from its core metadata (an `email.message.Message`-like object)."""
    expr = metadata.get("License-Expression")
    if expr:
        norm = spdx_expression(str(expr))
        return LicenseInfo(norm, None if norm else str(expr).strip()[:200], "License-Expression")
    classifiers = [c[len("License :: ") :] for c in metadata.get_all("Classifier") or [] if c.startswith("License :: ")]
    from_classifiers = sorted({CLASSIFIERS[c] for c in classifiers if c in CLASSIFIERS})
    raw = metadata.get("License")
    if raw and str(raw).strip() and str(raw).strip().upper() not in {"UNKNOWN", "NONE"}:
        text = str(raw).strip()
        first = text.splitlines()[0].strip()
        if "\n" not in text:
            norm = spdx_expression(text)
            if norm:
                return LicenseInfo(norm, None, "License")
        if from_classifiers:
            return LicenseInfo(" OR ".join(from_classifiers) if len(from_classifiers) > 1 else from_classifiers[0],
                               None, "classifier")
        return LicenseInfo(None, first[:200] or None, "License")
    if from_classifiers:
        joined = from_classifiers[0] if len(from_classifiers) == 1 else " OR ".join(from_classifiers)
        return LicenseInfo(joined, None, "classifier")
    if classifiers:
        return LicenseInfo(None, classifiers[0].split("::")[-1].strip(), "classifier")
    return LicenseInfo(None, None, "none")


# --- policy -------------------------------------------------------------------------------------------
Verdict = Literal["allowed", "denied", "unknown"]


@dataclass
class PolicyResult:
    verdict: Verdict
    reason: str
    denied_ids: list[str] = field(default_factory=list)


@dataclass
class LicensePolicy:
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    def _id_ok(self, lid: str) -> tuple[bool, str]:
        for pat in self.deny:
            if fnmatch.fnmatchcase(lid.lower(), pat.lower()):
                return False, f"{lid} matches deny {pat!r}"
        if self.allow:
            for pat in self.allow:
                if fnmatch.fnmatchcase(lid.lower(), pat.lower()):
                    return True, f"{lid} matches allow {pat!r}"
            return False, f"{lid} is not in the allow list"
        return True, f"{lid} not denied"

    def _eval(self, node: Any, bad: list[str]) -> bool:
        if isinstance(node, LicenseWithExceptionSymbol):
            ok, why = self._id_ok(str(node.license_symbol.key))
            if not ok:
                bad.append(why)
            return ok
        if isinstance(node, LicenseSymbol):
            ok, why = self._id_ok(str(node.key))
            if not ok:
                bad.append(why)
            return ok
        if isinstance(node, OR):
            sub: list[str] = []
            res = any(self._eval(a, sub) for a in node.args)
            if not res:
                bad.extend(sub)
            return res
        if isinstance(node, AND):
            results = [self._eval(a, bad) for a in node.args]
            return all(results)
        return False

    def check(self, lic: LicenseInfo | str | None) -> PolicyResult:
        """Is a component with this license acceptable? OR: one acceptable choice suffices; AND: all."""
        if isinstance(lic, LicenseInfo):
            expr, name = lic.expression, lic.name
        else:
            expr, name = (spdx_expression(lic) if lic else None), lic
        if not expr:
            if name and (self.allow or self.deny):
                # free text: compare it as a whole (e.g. a deny pattern "*GPL*" still catches it)
                ok, why = self._id_ok(name)
                if not ok and any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in self.deny):
                    return PolicyResult("denied", why, [name])
            return PolicyResult("unknown", f"no SPDX license ({name or 'none declared'})")
        try:
            tree = licensing().parse(expr)
        except ExpressionError as exc:  # pragma: no cover - spdx_expression validated it
            return PolicyResult("unknown", f"unparsable license {expr!r}: {exc}")
        bad: list[str] = []
        if self._eval(tree, bad):
            return PolicyResult("allowed", f"{expr} acceptable")
        return PolicyResult("denied", "; ".join(dict.fromkeys(bad)) or f"{expr} not acceptable", bad)
