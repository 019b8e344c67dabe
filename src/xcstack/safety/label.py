"""Implicit labels of generated content (GB 45438-2025): who generated an answer, for which request,
when — signed with the service's SM2 key (through the crypto capability) so that anyone holding the
public key can check it offline (`xcstack label verify`).

Wire form: `X-XC-Content-Label: <base64url(JSON)>.<base64url(DER SM2 signature)>` on the response, and
the same label as an `xc_label` object in the body (`{..., "sig": "<base64url>"}`). The JSON is
canonical (sorted keys, no spaces, UTF-8), so it is what was signed, byte for byte.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Protocol

HEADER = "x-xc-content-label"


class Signer(Protocol):
    async def sign(self, key: str, data: bytes) -> bytes: ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Label:
    fields: dict[str, Any]
    sig: bytes

    @property
    def header(self) -> str:
        return f"{_b64(canonical(self.fields))}.{_b64(self.sig)}"

    def body(self) -> dict[str, Any]:
        return {**self.fields, "sig": _b64(self.sig)}


class Labeler:
    def __init__(self, signer: Signer, key: str, provider: str, service: str, explicit: str | None) -> None:
        self.signer = signer
        self.key = key
        self.provider = provider
        self.service = service
        self.explicit = explicit

    async def issue(self, request_id: str | None, model: str) -> Label:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fields = {"label": "AIGC", "provider": self.provider, "service": self.service,
                  "request_id": request_id or "", "model": model, "time": now, "key": self.key}
        if self.explicit:
            fields["explicit"] = self.explicit  # the text a client shows next to the answer
        return Label(fields, await self.signer.sign(self.key, canonical(fields)))


def parse(text: str) -> tuple[dict[str, Any], bytes, bytes]:
    """A label as the header value or the body's `xc_label` JSON -> (fields, signed bytes, signature)."""
    text = text.strip()
    if text.startswith("{"):
        obj = json.loads(text)
        if "xc_label" in obj:
            obj = obj["xc_label"]
        sig = _unb64(str(obj.pop("sig")))
        return obj, canonical(obj), sig
    head, _, sig_text = text.partition(".")
    if not sig_text:
        raise ValueError("not a label: expected <base64url(JSON)>.<base64url(signature)>")
    signed = _unb64(head)
    return json.loads(signed), signed, _unb64(sig_text)


def verify(text: str, public_pem: str | bytes) -> dict[str, Any]:
    """The label's fields when its SM2 signature verifies under the PEM public key; else ValueError."""
    from xcstack.crypto.primitives.sm2 import SM2PublicKey

    fields, signed, sig = parse(text)
    if not SM2PublicKey.from_pem(public_pem).verify(signed, sig):
        raise ValueError("label signature does not verify")
    return fields
