"""Implicit labels of generated content (GB 45438-2025): who generated an answer, for which request,
when — provable with the service's SM2 key (through the crypto capability), offline, by anyone holding
the public key (`xcstack label verify`).

One SM2 signature per answer halved the gateway's requests/s (bench/safety.py), so labels are signed
in micro-batches: the labels issued while a signature is being made wait for the next one, which
signs the SM3 Merkle root (RFC 9162 tree hashing: leaf `SM3(0x00 || label JSON)`, node
`SM3(0x01 || left || right)`) of their canonical JSON. A label carries its inclusion proof (index,
batch size, audit path) and the batch's signature, so it still verifies on its own; what it proves is
unchanged: the key holder attested these exact fields (changing one changes the leaf, so the root,
so the signature fails). An idle service signs a lone label at once (a batch of one); under load one
signature covers up to `batch_max` labels and a label waits at most about two signing times.

Each batch is also appended to a batch log (`<data_dir>/labels/<issuer>.jsonl`, one JSON line per
batch: id, key, root, size, time, signature), so a batch can be looked up later
(`xcstack label batch ID`) and the labels a service issued counted.

Wire form: `X-XC-Content-Label: <base64url(label JSON)>.<base64url(proof JSON)>` on the response, and
the same as an `xc_label` object in the body (`{...label fields, "proof": {...}}`). JSON is canonical
(sorted keys, no spaces, UTF-8), so the leaf is recomputed byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from xcstack.crypto.recipes import sm3

HEADER = "x-xc-content-label"
BATCH_TYPE = "xc-label-batch/1"  # the signed statement's type: never confused with another signed JSON

log = logging.getLogger("xcstack.safety")


class Signer(Protocol):
    async def sign(self, key: str, data: bytes) -> bytes: ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- Merkle tree (RFC 9162 section 2.1, SM3) ---------------------------------------------------------
def leaf_hash(data: bytes) -> bytes:
    return sm3(b"\x00" + data)


def _node(left: bytes, right: bytes) -> bytes:
    return sm3(b"\x01" + left + right)


def merkle(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """(root, audit path of each leaf) of the tree over leaf hashes `leaves` (at least one)."""
    n = len(leaves)
    if n == 1:
        return leaves[0], [[]]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    left, lp = merkle(leaves[:k])
    right, rp = merkle(leaves[k:])
    return _node(left, right), [[*p, right] for p in lp] + [[*p, left] for p in rp]


def root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2); ValueError when it cannot be one."""
    if not 0 <= index < size:
        raise ValueError("proof index outside the batch")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("proof path too long")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while not fn & 1 and fn:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("proof path too short")
    return r


def statement(batch: str, key: str, root: bytes, size: int, time: str) -> bytes:
    """What the SM2 key signs for a batch."""
    return canonical({"type": BATCH_TYPE, "batch": batch, "key": key, "root": root.hex(), "size": size,
                      "time": time})


# -- labels ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Label:
    fields: dict[str, Any]
    proof: dict[str, Any]  # batch, index, size, time, path (base64url hashes), sig (base64url DER)
    # canonical(fields) when the issuer has it already (it hashed it for the leaf), and the header once made:
    # the label's JSON is encoded once per answer, not once per use
    fields_json: bytes | None = field(default=None, compare=False, repr=False)
    _header: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def header(self) -> str:
        if not self._header:
            head = self.fields_json if self.fields_json is not None else canonical(self.fields)
            self._header.append(f"{_b64(head)}.{_b64(canonical(self.proof))}")
        return self._header[0]

    def body(self) -> dict[str, Any]:
        return {**self.fields, "proof": self.proof}


class BatchLog:
    """Append-only JSONL of signed batches, one file per issuing process (no interleaved writers).

    The file stays open (O_APPEND, one write per batch): opening and closing it per batch cost more than
    the write under load, when a batch is signed every few requests."""

    def __init__(self, directory: Path, issuer: str) -> None:
        self.path = Path(directory) / f"{issuer}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    def append(self, record: dict[str, Any]) -> None:
        line = canonical(record) + b"\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if os.write(self._fd, line) == len(line):
                return
        except OSError:
            self.close()  # reopened by the next batch
            raise
        self.close()
        raise OSError(f"short write to {self.path}")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def find_batch(directory: Path, batch: str) -> dict[str, Any] | None:
    """The logged record of batch `batch` (`<issuer>-<n>`), or None."""
    issuer, _, _ = batch.rpartition("-")
    path = Path(directory) / f"{issuer}.jsonl"
    if not issuer or "/" in issuer or not path.is_file():
        return None
    with path.open("rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("batch") == batch:
                    return dict(rec)
    return None


class Labeler:
    """Issues labels; signs them in micro-batches (one SM2 signature in flight at a time)."""

    def __init__(self, signer: Signer, key: str, provider: str, service: str, explicit: str | None,
                 batch_log: Path | None = None, batch_max: int = 256) -> None:
        self.signer = signer
        self.key = key
        self.provider = provider
        self.service = service
        self.explicit = explicit
        self.batch_max = batch_max
        self.issuer = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.{os.getpid()}.{os.urandom(3).hex()}"
        self.log = BatchLog(batch_log, self.issuer) if batch_log is not None else None
        self.batches = 0
        self._pending: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self._task: asyncio.Task[None] | None = None

    def fields(self, request_id: str | None, model: str) -> dict[str, Any]:
        fields = {"label": "AIGC", "provider": self.provider, "service": self.service,
                  "request_id": request_id or "", "model": model, "time": _now(), "key": self.key}
        if self.explicit:
            fields["explicit"] = self.explicit  # the text a client shows next to the answer
        return fields

    async def issue(self, request_id: str | None, model: str) -> Label:
        fields = self.fields(request_id, model)
        data = canonical(fields)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((leaf_hash(data), fut))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return Label(fields, await fut, data)

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # labels asked for in this loop iteration join the first batch
            while self._pending:
                batch, self._pending = self._pending[:self.batch_max], self._pending[self.batch_max:]
                try:
                    proofs = await self._sign([leaf for leaf, _ in batch])
                except Exception as exc:  # each waiting request gets the signer's error
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), proof in zip(batch, proofs, strict=True):
                    if not fut.done():  # a request that went away meanwhile
                        fut.set_result(proof)
        finally:
            self._task = None

    async def _sign(self, leaves: list[bytes]) -> list[dict[str, Any]]:
        root, paths = merkle(leaves)
        self.batches += 1
        batch, size, time = f"{self.issuer}-{self.batches}", len(leaves), _now()
        sig = await self.signer.sign(self.key, statement(batch, self.key, root, size, time))
        if self.log is not None:
            try:
                self.log.append({"batch": batch, "key": self.key, "root": root.hex(), "size": size, "time": time,
                                 "sig": _b64(sig)})
            except OSError as exc:  # the labels still verify on their own; the log is for look-ups
                log.error("label batch log not written (%s): %s", self.log.path, exc)
        sig_text = _b64(sig)
        text: dict[bytes, str] = {}  # a node is on the path of many leaves: encoded once per batch
        for path in paths:
            for h in path:
                if h not in text:
                    text[h] = _b64(h)
        return [{"batch": batch, "index": i, "size": size, "time": time, "path": [text[h] for h in path],
                 "sig": sig_text} for i, path in enumerate(paths)]


# -- verification --------------------------------------------------------------------------------------
def parse(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A label as the header value, the body's `xc_label` object or a whole answer -> (fields, proof)."""
    text = text.strip()
    if text.startswith("{"):
        obj = json.loads(text)
        if "xc_label" in obj:
            obj = obj["xc_label"]
        proof = obj.pop("proof")
        if not isinstance(proof, dict):
            raise ValueError("not a label: proof is not an object")
        return obj, proof
    head, _, tail = text.partition(".")
    if not tail:
        raise ValueError("not a label: expected <base64url(JSON)>.<base64url(proof JSON)>")
    fields, proof = json.loads(_unb64(head)), json.loads(_unb64(tail))
    if not isinstance(fields, dict) or not isinstance(proof, dict):
        raise ValueError("not a label: label and proof must be JSON objects")
    return fields, proof


def verify(text: str, public_pem: str | bytes, batch_log: Path | None = None) -> dict[str, Any]:
    """The label's fields when its inclusion proof leads to a root whose batch signature verifies
    under the PEM public key (and, with `batch_log`, the logged batch is that one); else ValueError."""
    from xcstack.crypto.primitives.sm2 import SM2PublicKey

    fields, proof = parse(text)
    try:
        batch, index, size, time = str(proof["batch"]), int(proof["index"]), int(proof["size"]), str(proof["time"])
        path = [_unb64(str(h)) for h in proof["path"]]
        sig = _unb64(str(proof["sig"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed proof: {exc}") from None
    if any(len(h) != 32 for h in path):
        raise ValueError("malformed proof: a path hash is not 32 bytes")
    root = root_from_path(leaf_hash(canonical(fields)), index, size, path)
    if not SM2PublicKey.from_pem(public_pem).verify(statement(batch, str(fields.get("key", "")), root, size, time),
                                                    sig):
        raise ValueError("label signature does not verify")
    if batch_log is not None:
        rec = find_batch(batch_log, batch)
        if rec is None:
            raise ValueError(f"batch {batch} is not in the batch log {batch_log}")
        if rec.get("root") != root.hex() or rec.get("size") != size or rec.get("sig") != proof["sig"]:
            raise ValueError(f"batch {batch} in the log does not match the label")
    return fields
