"""`POST /v1/crypto/{sign,verify,encrypt,decrypt,hash,hmac,random}`, the keys' public information and
`POST /v1/crypto/keys/{name}/rotate`: the thin HTTP adapter.

Each endpoint needs the coarse permission `crypto:<op>` (`@requires`) and, for keyed ops, the
fine-grained `key:<name>` / `<op>` (`authorize`). The work happens in the key owner (`CryptoClient`).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xcstack.apidoc import api
from xcstack.crypto.client import CryptoClient
from xcstack.crypto.errors import InputTooLarge, WrongKeyType
from xcstack.crypto.keystore import check_name
from xcstack.crypto.protocol import (
    MAX_VERSION,
    DecryptRequest,
    DecryptResponse,
    EncryptRequest,
    EncryptResponse,
    HashRequest,
    HashResponse,
    HmacRequest,
    HmacResponse,
    KeyInfo,
    KeyInfoQuery,
    KeyList,
    RandomRequest,
    RandomResponse,
    SignRequest,
    SignResponse,
    VerifyRequest,
    VerifyResponse,
    b64,
    b64decode,
)
from xcstack.crypto.settings import CryptoSettings
from xcstack.errors import BadRequest, CoreCode, XCError
from xcstack.httputil import JSONResponse, read_model
from xcstack.security.guard import audit, authorize, requires


def _key_check(op: str) -> str:
    return f"Also `key:<name>` / `{op}` on the key the body names."


# the errors every keyed operation may answer besides the common ones (docs/crypto.md)
_KEYED = ("Unknown key (or version): 404 `key_not_found`; a key of the wrong kind: 400 `wrong_key_type`; "
          "bad base64: 400 `invalid_base64`; input over `[crypto] max_input_bytes`: 400 `input_too_large`; "
          "key owner down or stuck: 503 `crypto_unavailable` / `crypto_timeout` with `Retry-After`.")


def query_version(raw: str | None) -> int | None:
    """`?version=` as 1..2^31-1 in ASCII digits (str.isdigit also takes '²' and '١', which int() then
    rejects or reads): anything else is a 400, never a 500."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or not 1 <= int(raw) <= MAX_VERSION:
        raise BadRequest(
            f"version must be an integer from 1 to {MAX_VERSION}", code=CoreCode.INVALID_PARAMETER, param="version"
        )
    return int(raw)


class CryptoRoutes:
    def __init__(self, client: CryptoClient, settings: CryptoSettings) -> None:
        self.client = client
        self.limit = settings.max_input_bytes

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/v1/crypto/sign", self.sign, methods=["POST"]),
            Route("/v1/crypto/verify", self.verify, methods=["POST"]),
            Route("/v1/crypto/encrypt", self.encrypt, methods=["POST"]),
            Route("/v1/crypto/decrypt", self.decrypt, methods=["POST"]),
            Route("/v1/crypto/hash", self.hash, methods=["POST"]),
            Route("/v1/crypto/hmac", self.hmac, methods=["POST"]),
            Route("/v1/crypto/random", self.random, methods=["POST"]),
            Route("/v1/crypto/keys", self.list_keys, methods=["GET"]),
            Route("/v1/crypto/keys/{name}", self.key_info, methods=["GET"]),
            Route("/v1/crypto/keys/{name}/rotate", self.rotate, methods=["POST"]),
        ]

    def _sized(self, data: bytes) -> bytes:
        if len(data) > self.limit:
            raise InputTooLarge(f"input is {len(data)} bytes; the limit is {self.limit}")
        return data

    @api("Sign data with an SM2 key (DER or raw r||s signature)", body=SignRequest, response=SignResponse,
         errors=(404,), checks=_key_check("sign"), description=_KEYED)
    @requires("crypto", "sign")
    async def sign(self, request: Request) -> Response:
        body = await read_model(request, SignRequest)
        await authorize(request, f"key:{body.key}", "sign")
        meta: dict[str, object] = {"key": body.key, "fmt": body.format}
        if body.uid is not None:
            meta["uid"] = body.uid.encode("utf-8")
        if body.version is not None:
            meta["version"] = body.version
        m, sig = await self.client.call("sign", meta, self._sized(body.payload()))
        return JSONResponse(
            {"key": body.key, "version": m["version"], "algorithm": m["algorithm"], "format": body.format,
             "signature": b64(sig)}
        )

    @api("Verify a signature with an SM2 key (every active version, newest first, unless `version` is given)",
         body=VerifyRequest, response=VerifyResponse, errors=(404,), checks=_key_check("verify"),
         description="A signature that does not match answers 200 with `valid: false`; one that is not a "
                     "signature at all 400 `malformed_signature`. " + _KEYED)
    @requires("crypto", "verify")
    async def verify(self, request: Request) -> Response:
        body = await read_model(request, VerifyRequest)
        await authorize(request, f"key:{body.key}", "verify")
        meta: dict[str, object] = {"key": body.key, "fmt": body.format, "sig": b64decode(body.signature, "signature")}
        if body.uid is not None:
            meta["uid"] = body.uid.encode("utf-8")
        if body.version is not None:
            meta["version"] = body.version
        m, _ = await self.client.call("verify", meta, self._sized(body.payload()))
        return JSONResponse({"key": body.key, "valid": bool(m["valid"]), "version": m.get("version")})

    @api("Encrypt with an SM4 key (SM4-GCM, `aad` bound) or an SM2 key (1-255 bytes, no `aad`)",
         body=EncryptRequest, response=EncryptResponse, errors=(404,), checks=_key_check("encrypt"),
         description="SM2 input over 255 bytes or with `aad`: 400 `invalid_crypto_input`. " + _KEYED)
    @requires("crypto", "encrypt")
    async def encrypt(self, request: Request) -> Response:
        body = await read_model(request, EncryptRequest)
        await authorize(request, f"key:{body.key}", "encrypt")
        meta: dict[str, object] = {"key": body.key, "fmt": body.format}
        if body.aad:
            meta["aad"] = b64decode(body.aad, "aad")
        m, ct = await self.client.call("encrypt", meta, self._sized(body.payload()))
        return JSONResponse(
            {"key": body.key, "version": m["version"], "algorithm": m["algorithm"], "format": body.format,
             "ciphertext": b64(ct)}
        )

    @api("Decrypt with an SM4 or SM2 key (every active version, newest first, unless `version` is given)",
         body=DecryptRequest, response=DecryptResponse, errors=(404,), checks=_key_check("decrypt"),
         description="Tampered or wrong-key ciphertext: 400 `decryption_failed`; not a ciphertext at all: "
                     "400 `malformed_ciphertext`. " + _KEYED)
    @requires("crypto", "decrypt")
    async def decrypt(self, request: Request) -> Response:
        body = await read_model(request, DecryptRequest)
        await authorize(request, f"key:{body.key}", "decrypt")
        meta: dict[str, object] = {"key": body.key, "fmt": body.format}
        if body.aad:
            meta["aad"] = b64decode(body.aad, "aad")
        if body.version is not None:
            meta["version"] = body.version
        m, pt = await self.client.call("decrypt", meta, self._sized(b64decode(body.ciphertext, "ciphertext")))
        return JSONResponse({"key": body.key, "version": m["version"], "plaintext": b64(pt)})

    @api("SM3 digest of data (hex)", body=HashRequest, response=HashResponse,
         description="Input over `[crypto] max_input_bytes`: 400 `input_too_large`; bad base64: 400 "
                     "`invalid_base64`.")
    @requires("crypto", "hash")
    async def hash(self, request: Request) -> Response:
        body = await read_model(request, HashRequest)
        _, digest = await self.client.call("hash", {"alg": body.alg}, self._sized(body.payload()))
        return JSONResponse({"alg": body.alg, "digest": digest.hex()})

    @api("HMAC-SM3 of data with an hmac-sm3 key (hex)", body=HmacRequest, response=HmacResponse, errors=(404,),
         checks=_key_check("hmac"), description=_KEYED)
    @requires("crypto", "hmac")
    async def hmac(self, request: Request) -> Response:
        body = await read_model(request, HmacRequest)
        await authorize(request, f"key:{body.key}", "hmac")
        m, mac = await self.client.call("hmac", {"key": body.key}, self._sized(body.payload()))
        return JSONResponse({"key": body.key, "version": m["version"], "algorithm": m["algorithm"], "mac": mac.hex()})

    @api("The keys: name, kind, algorithm, backend, newest version, number of versions (no key material)",
         response=KeyList)
    @requires("crypto", "list")
    async def list_keys(self, request: Request) -> Response:
        return JSONResponse({"keys": await self.client.list_keys()})

    @api("A key's public information: kind, version, public key (hex) and PEM for SM2; null for symmetric keys",
         query=KeyInfoQuery, response=KeyInfo, errors=(404,), checks="Also `key:<name>` / `read` on that key.",
         description="Unknown key or version: 404 `key_not_found`; a bad key name: 400 `invalid_crypto_input`; "
                     "a bad `version`: 400 `invalid_parameter`.")
    @requires("crypto", "read")
    async def key_info(self, request: Request) -> Response:
        """Public information of a key (kind, versions, public key PEM for SM2): what verifiers need."""
        name = request.path_params["name"]
        check_name(name)
        await authorize(request, f"key:{name}", "read")
        version = query_version(request.query_params.get("version"))
        try:
            info = await self.client.public_key(name, version)
        except WrongKeyType:
            m, _ = await self.client.call("list_keys")
            for k in m["keys"]:
                if k["name"] == name:
                    return JSONResponse({**k, "public_key": None, "pem": None})
            raise
        return JSONResponse(info)

    @api("Rotate a key: a new version signs and encrypts from now on; older versions stay for verify/decrypt",
         body=None, response=KeyInfo, errors=(404,), checks="Also `key:<name>` / `rotate` on that key.",
         description="Audited (`crypto.rotate`). Unknown key: 404 `key_not_found`; a bad key name: 400 "
                     "`invalid_crypto_input`; the security capability's own keys (audit signing, secret box) "
                     "are rotated on the server (`xcstack key rotate`), never through the API (403); key owner "
                     "down or stuck: 503 `crypto_unavailable` / `crypto_timeout`.")
    @requires("crypto", "rotate")
    async def rotate(self, request: Request) -> Response:
        """A new version of a key (the console's Rotate button; `xcstack key rotate NAME` on the server)."""
        name = request.path_params["name"]
        check_name(name)
        await authorize(request, f"key:{name}", "rotate")
        try:
            rec = await self.client.rotate_key(name)
        except XCError as exc:
            await audit(request, "crypto.rotate", f"key:{name}", "failure", {"code": str(exc.code)})
            raise
        await audit(request, "crypto.rotate", f"key:{name}", "success", {"version": rec["version"]})
        if rec.get("kind") == "sm2":
            return JSONResponse(await self.client.public_key(name, int(rec["version"])))
        return JSONResponse({**rec, "pem": None})

    @api("Random bytes from the key owner's device (base64)", body=RandomRequest, response=RandomResponse)
    @requires("crypto", "random")
    async def random(self, request: Request) -> Response:
        body = await read_model(request, RandomRequest)
        _, data = await self.client.call("random", {"n": body.n})
        return JSONResponse({"n": body.n, "random": b64(data)})
