"""SM2/SM3/SM4 adapters: standard vectors, round trips, encodings, tamper rejection, interop.

Every SM2 test runs once per SM2 backend (`sm2_backend` fixture): what xcstack ships must give the
same answers on each of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from xcstack.crypto import sm
from xcstack.crypto.errors import (
    DecryptionFailed,
    InvalidCryptoInput,
    MalformedCiphertext,
    MalformedKey,
    MalformedSignature,
)
from xcstack.crypto.primitives.sm2_backends import BACKEND_NAMES

# ---- SM3 (GB/T 32905 appendix A) ---------------------------------------------------------------
SM3_ABC = "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
SM3_64 = "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"


def test_sm3_standard_vectors() -> None:
    assert sm.sm3(b"abc").hex() == SM3_ABC
    assert sm.sm3(b"abcd" * 16).hex() == SM3_64


def test_sm3_incremental_matches_one_shot() -> None:
    h = sm.SM3(b"ab")
    h2 = h.copy()
    h.update(b"c")
    assert h.hexdigest() == SM3_ABC
    for _ in range(16):
        h2.update(b"")
    h2.update(b"cd" + b"abcd" * 15)
    assert h2.digest().hex() == SM3_64


def test_hmac_sm3_against_independent_construction() -> None:
    # RFC 2104 by hand over the SM3 vector function
    key, msg = b"k" * 20, b"message"
    k = key.ljust(64, b"\0")
    inner = sm.sm3(bytes(b ^ 0x36 for b in k) + msg)
    expect = sm.sm3(bytes(b ^ 0x5C for b in k) + inner)
    assert sm.hmac_sm3(key, msg) == expect
    assert sm.hmac_sm3_verify(key, msg, expect)
    assert not sm.hmac_sm3_verify(key, msg + b"x", expect)
    import gmssl_pyx

    assert sm.hmac_sm3(key, msg) == gmssl_pyx.sm3_hmac(key, msg)
    with pytest.raises(InvalidCryptoInput):
        sm.hmac_sm3(b"", msg)


def test_pbkdf2_sm3_matches_rfc8018_by_hand() -> None:
    pw, salt = b"password", b"salt"
    # one block, 2 iterations: U1 = HMAC(pw, salt||INT(1)), U2 = HMAC(pw, U1), T = U1 ^ U2
    u1 = sm.hmac_sm3(pw, salt + b"\x00\x00\x00\x01")
    u2 = sm.hmac_sm3(pw, u1)
    t = bytes(a ^ b for a, b in zip(u1, u2, strict=True))
    assert sm.pbkdf2_sm3(pw, salt, 2, 32) == t
    assert sm.pbkdf2_sm3("password", salt, 2, 16) == t[:16]
    assert len(sm.pbkdf2_sm3(pw, salt, 1, 48)) == 48
    with pytest.raises(InvalidCryptoInput):
        sm.pbkdf2_sm3(pw, salt, 0)


# ---- SM4 (GB/T 32907 appendix A) ---------------------------------------------------------------
SM4_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
SM4_CT = "681edf34d206965e86b3e94f536e4246"


def test_sm4_standard_vector() -> None:
    # one block CBC with a zero IV is ECB of the block
    ct = sm.sm4_cbc_encrypt(SM4_KEY, b"\0" * 16, SM4_KEY, padding=False)
    assert ct.hex() == SM4_CT
    assert sm.sm4_cbc_decrypt(SM4_KEY, b"\0" * 16, ct, padding=False) == SM4_KEY


def test_sm4_single_block_matches_independent_implementation() -> None:
    import gmalglib

    assert gmalglib.sm4_encrypt(SM4_KEY, SM4_KEY).hex() == SM4_CT


def test_sm4_standard_vector_encrypted_one_million_times() -> None:
    """GB/T 32907 appendix A.2: the plaintext encrypted 1,000,000 times under the same key."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.SM4(SM4_KEY), modes.ECB()).encryptor()
    x = SM4_KEY
    for _ in range(1_000_000):
        x = enc.update(x)
    assert x.hex() == "595298c7c6fd271f0402f804c33d3f66"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000])
def test_sm4_cbc_roundtrip_and_interop(size: int) -> None:
    import gmssl_pyx

    key, iv, data = sm.random_bytes(16), sm.random_bytes(16), sm.random_bytes(size)
    ct = sm.sm4_cbc_encrypt(key, iv, data)
    if size:  # gmssl-pyx refuses empty input
        assert ct == gmssl_pyx.sm4_cbc_padding_encrypt(key, iv, data)
    assert len(ct) == (size // 16 + 1) * 16
    assert sm.sm4_cbc_decrypt(key, iv, ct) == data


def test_sm4_cbc_errors() -> None:
    with pytest.raises(MalformedCiphertext):
        sm.sm4_cbc_decrypt(SM4_KEY, b"\0" * 16, b"x" * 15)
    with pytest.raises(InvalidCryptoInput):
        sm.sm4_cbc_encrypt(b"short", b"\0" * 16, b"x")
    with pytest.raises(InvalidCryptoInput):
        sm.sm4_cbc_encrypt(SM4_KEY, b"\0" * 16, b"x", padding=False)


def test_sm4_ctr_roundtrip_and_interop() -> None:
    import gmssl_pyx

    key, ctr, data = sm.random_bytes(16), sm.random_bytes(16), sm.random_bytes(100)
    ct = sm.sm4_ctr(key, ctr, data)
    assert ct == gmssl_pyx.sm4_ctr_encrypt(key, ctr, data)
    assert sm.sm4_ctr_decrypt(key, ctr, ct) == data


def test_sm4_gcm_roundtrip_interop_and_tamper() -> None:
    import gmssl_pyx

    key, nonce, data, aad = sm.random_bytes(16), sm.random_bytes(12), b"secret payload", b"hdr"
    ct = sm.sm4_gcm_encrypt(key, nonce, data, aad)
    c2, tag = gmssl_pyx.sm4_gcm_encrypt(key, nonce, aad, data)
    assert ct == c2 + tag
    assert sm.sm4_gcm_decrypt(key, nonce, ct, aad) == data
    bad = bytearray(ct)
    bad[0] ^= 1
    with pytest.raises(DecryptionFailed):
        sm.sm4_gcm_decrypt(key, nonce, bytes(bad), aad)
    with pytest.raises(DecryptionFailed):
        sm.sm4_gcm_decrypt(key, nonce, ct, b"other aad")
    with pytest.raises(MalformedCiphertext):
        sm.sm4_gcm_decrypt(key, nonce, b"short", aad)
    sealed = sm.sm4_gcm_seal(key, data, aad)
    assert sm.sm4_gcm_open(key, sealed, aad) == data
    assert sm.sm4_gcm_seal(key, data, aad) != sealed  # fresh nonce


# ---- SM2 -----------------------------------------------------------------------------------------
@pytest.fixture(params=BACKEND_NAMES)
def sm2_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Switch xcstack's SM2 backend for one test (test_sm2_backends.py checks all of them load here)."""
    name: str = request.param
    try:
        prev = sm.set_sm2_backend(name)
    except (ImportError, OSError) as exc:
        pytest.skip(f"SM2 backend {name} does not load here: {exc}")
    try:
        yield name
    finally:
        sm.set_sm2_backend(prev or "auto")


# GM/T 0003.5-2012 annex A (= GB/T 32918.5-2017), the examples on the recommended curve
STD_D = bytes.fromhex("3945208f7b2144b13f36e38ac6d39f95889393692860b51a42fb81ef4df7c5b8")
STD_PUB = bytes.fromhex(
    "09f9df311e5421a150dd7d161e4bc5c672179fad1833fc076bb08ff356f35020"
    "ccea490ce26775a52dc6ea718cc1aa600aed05fbf35e084a6632f6072da9ad13"
)
STD_K = bytes.fromhex("59276e27d506861a16680f3ad9c02dccef3cc1fa3cdbe4ce6d54b80deac1bc21")
STD_Z = "b2e14c5c79c6df5b85f4fe7ed8db7a262b9da7e07ccb0ea9f4747b8ccda8a4f3"  # ID 1234567812345678
STD_E = "f0b43e94ba45accaace692ed534382eb17e6ab5a19ce7b31f4486fdfc0d28640"  # SM3(Z || "message digest")
STD_SIG = bytes.fromhex(
    "f5a03b0648d2c4630eeac513e1bb81a15944da3827d5b74143ac7eaceee720b3"
    "b1b6aa29df212fd8763182bc0d421ca1bb9038fd1f7f42d4840b69c485bbc1aa"
)
STD_CT = bytes.fromhex(  # "encryption standard" with the same k, C1 || C3 || C2
    "04"
    "04ebfc718e8d1798620432268e77feb6415e2ede0e073c0f4f640ecd2e149a73"
    "e858f9d81e5430a57b36daab8f950a3c64e6ee6a63094d99283aff767e124df0"
    "59983c18f809e262923c53aec295d30383b54e39d609d160afcb1908d0bd8766"
    "21886ca989ca9c7d58087307ca93092d651efa"
)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_standard_vectors() -> None:
    """Key, Z, e, the signature and the ciphertext of the standard's examples, through the backend in use."""
    key = sm.SM2PrivateKey.from_bytes(STD_D)
    assert key.public_key.to_bytes() == STD_PUB
    assert key.public_key.z().hex() == STD_Z
    assert key.public_key.digest(b"message digest").hex() == STD_E
    pub = sm.SM2PublicKey.from_bytes(STD_PUB)
    assert pub.verify(b"message digest", STD_SIG, fmt="raw")
    assert pub.verify(b"message digest", sm.sig_raw_to_der(STD_SIG))
    assert not pub.verify(b"message digesT", STD_SIG, fmt="raw")
    assert key.decrypt(STD_CT, fmt="c1c3c2") == b"encryption standard"
    assert key.decrypt(sm.ct_c1c3c2_to_der(STD_CT)) == b"encryption standard"
    assert key.decrypt(sm.ct_c1c3c2_to_c1c2c3(STD_CT), fmt="c1c2c3") == b"encryption standard"
    # our signatures with this key verify against the standard's public key (and are randomised)
    a, b = key.sign(b"message digest", fmt="raw"), key.sign(b"message digest", fmt="raw")
    assert a != b and pub.verify(b"message digest", a, fmt="raw") and pub.verify(b"message digest", b, fmt="raw")


def test_sm2_standard_signature_with_the_standards_nonce() -> None:
    """The exact (r, s) of the standard from its k: gmalglib is the one library that takes a nonce source."""
    import gmalglib.sm2 as g

    signer = g.SM2(STD_D, rnd_fn=lambda n: STD_K[::-1][:n])  # it reads its random bytes little-endian
    assert signer.sign(b"message digest") == STD_SIG
    assert signer.encrypt(b"encryption standard") == STD_CT


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_z_matches_independent_implementation() -> None:
    import gmalglib.sm2 as g

    key = sm.SM2PrivateKey.generate()
    for uid in (sm.DEFAULT_UID, b"alice@example.com"):
        other = g.SM2(key.to_bytes(), uid=uid)
        assert other.get_entity_info() == key.public_key.z(uid)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_public_from_private_matches_library() -> None:
    import gmalglib.sm2 as g

    key = sm.SM2PrivateKey.generate()
    assert sm.SM2PrivateKey.from_bytes(key.to_bytes()).public_key == key.public_key
    assert g.SM2.get_pk(key.to_bytes())[1:] == key.public_key.to_bytes()


@pytest.mark.parametrize("fmt", ["der", "raw"])
@pytest.mark.usefixtures("sm2_backend")
def test_sm2_sign_verify_roundtrip(fmt: sm.SigFormat) -> None:
    key = sm.SM2PrivateKey.generate()
    sig = key.sign(b"hello", fmt=fmt)
    assert key.public_key.verify(b"hello", sig, fmt=fmt)
    assert not key.public_key.verify(b"hello!", sig, fmt=fmt)
    assert not key.public_key.verify(b"hello", sig, uid=b"other", fmt=fmt)
    other = sm.SM2PrivateKey.generate().public_key
    assert not other.verify(b"hello", sig, fmt=fmt)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_signatures_interop_both_ways() -> None:
    import gmalglib.sm2 as g

    uid = b"xcstack-test"
    key = sm.SM2PrivateKey.generate()
    theirs = g.SM2(key.to_bytes(), uid=uid)
    for msg in (b"", b"abc", bytes(range(256)) * 10):
        ours = key.sign(msg, uid=uid, fmt="raw")
        assert theirs.verify(msg, ours)
        their_sig = theirs.sign(msg)
        assert key.public_key.verify(msg, their_sig, uid=uid, fmt="raw")
        assert key.public_key.verify(msg, sm.sig_raw_to_der(their_sig), uid=uid)
        # a gmssl-pyx full (non-digest) signature verifies with our Z path too
        import gmssl_pyx

        full = gmssl_pyx.sm2_sign(key.to_bytes(), key.public_key.to_bytes(), msg, uid)
        assert key.public_key.verify(msg, full, uid=uid)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_tampered_signature_is_false_not_exception() -> None:
    key = sm.SM2PrivateKey.generate()
    raw = bytearray(key.sign(b"m", fmt="raw"))
    raw[5] ^= 0x40
    assert key.public_key.verify(b"m", bytes(raw), fmt="raw") is False


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x30\x00", b"garbage", b"\x30\x06\x02\x01\x01\x02\x01\x01\x00", b"\x30\x06\x02\x01\x00\x02\x01\x01"],
)
@pytest.mark.usefixtures("sm2_backend")
def test_sm2_malformed_signature_raises_clear_error(bad: bytes) -> None:
    key = sm.SM2PrivateKey.generate()
    with pytest.raises(MalformedSignature):
        key.public_key.verify(b"m", bad)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_raw_signature_wrong_length() -> None:
    key = sm.SM2PrivateKey.generate()
    with pytest.raises(MalformedSignature):
        key.public_key.verify(b"m", b"\x01" * 63, fmt="raw")


@pytest.mark.usefixtures("sm2_backend")
def test_sig_der_raw_conversion_roundtrip() -> None:
    key = sm.SM2PrivateKey.generate()
    for _ in range(20):  # covers r/s with and without the high bit set
        der = key.sign(b"x")
        assert sm.sig_raw_to_der(sm.sig_der_to_raw(der)) == der


@pytest.mark.parametrize("fmt", ["der", "c1c3c2", "c1c2c3"])
@pytest.mark.usefixtures("sm2_backend")
def test_sm2_encrypt_decrypt_roundtrip(fmt: sm.CtFormat) -> None:
    key = sm.SM2PrivateKey.generate()
    for size in (1, 32, 255):
        pt = sm.random_bytes(size)
        ct = key.public_key.encrypt(pt, fmt=fmt)
        assert key.decrypt(ct, fmt=fmt) == pt


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_ciphertext_conversions() -> None:
    key = sm.SM2PrivateKey.generate()
    der = key.public_key.encrypt(b"hello")
    raw = sm.ct_der_to_c1c3c2(der)
    assert raw[0] == 4 and len(raw) == 65 + 32 + 5
    assert sm.ct_c1c3c2_to_der(raw) == der
    old = sm.ct_c1c3c2_to_c1c2c3(raw)
    assert sm.ct_c1c2c3_to_c1c3c2(old) == raw
    assert key.decrypt(raw[1:], fmt="c1c3c2") == b"hello"  # without the 04 prefix


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_encryption_interop_both_ways() -> None:
    import gmalglib.sm2 as g

    key = sm.SM2PrivateKey.generate()
    theirs = g.SM2(key.to_bytes())
    ours = key.public_key.encrypt(b"to gmalglib", fmt="c1c3c2")
    assert theirs.decrypt(ours) == b"to gmalglib"
    their_ct = theirs.encrypt(b"from gmalglib")
    assert key.decrypt(their_ct, fmt="c1c3c2") == b"from gmalglib"


@pytest.mark.parametrize("where", [10, 70, 100, -1])
@pytest.mark.usefixtures("sm2_backend")
def test_sm2_tampered_ciphertext_rejected(where: int) -> None:
    key = sm.SM2PrivateKey.generate()
    raw = bytearray(key.public_key.encrypt(b"attack at dawn", fmt="c1c3c2"))
    raw[where] ^= 0x01
    with pytest.raises(DecryptionFailed):
        key.decrypt(bytes(raw), fmt="c1c3c2")


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_wrong_key_decrypt_fails_cleanly() -> None:
    a, b = sm.SM2PrivateKey.generate(), sm.SM2PrivateKey.generate()
    with pytest.raises(DecryptionFailed):
        b.decrypt(a.public_key.encrypt(b"x"))


@pytest.mark.parametrize("bad", [b"", b"\x30\x03\x02\x01\x01", b"\x04" + b"\x01" * 50, b"\x05" * 200])
@pytest.mark.usefixtures("sm2_backend")
def test_sm2_malformed_ciphertext(bad: bytes) -> None:
    key = sm.SM2PrivateKey.generate()
    with pytest.raises((MalformedCiphertext, DecryptionFailed)):
        key.decrypt(bad)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_encrypt_size_limits() -> None:
    pub = sm.SM2PrivateKey.generate().public_key
    with pytest.raises(InvalidCryptoInput):
        pub.encrypt(b"")
    with pytest.raises(InvalidCryptoInput):
        pub.encrypt(b"x" * 256)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_public_key_encodings() -> None:
    key = sm.SM2PrivateKey.generate()
    pub = key.public_key
    for enc in (pub.to_bytes(), pub.to_bytes("uncompressed"), pub.to_bytes("compressed"), pub.to_der()):
        assert sm.SM2PublicKey.from_bytes(enc) == pub
    assert sm.SM2PublicKey.from_pem(pub.to_pem()) == pub
    with pytest.raises(MalformedKey):
        sm.SM2PublicKey.from_bytes(b"\x04" + b"\x01" * 64)  # not on the curve
    with pytest.raises(MalformedKey):
        sm.SM2PublicKey.from_bytes(b"\x01" * 10)
    with pytest.raises(MalformedKey):
        sm.SM2PrivateKey(b"\x00" * 32)
    assert "SM2PrivateKey(" in repr(key) and key.to_bytes().hex() not in repr(key)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_pem_is_readable_by_openssl(tmp_path: pytest.TempPathFactory) -> None:
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("no openssl binary")
    key = sm.SM2PrivateKey.generate()
    p = tmp_path / "pub.pem"  # type: ignore[operator]
    p.write_text(key.public_key.to_pem())
    out = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(p), "-text", "-noout"], capture_output=True, text=True, check=True
    ).stdout
    assert "SM2" in out


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_signature_verifies_with_openssl(tmp_path: pytest.TempPathFactory) -> None:
    """A third implementation: OpenSSL 3 verifies our signature over the message with Z(uid)."""
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("no openssl binary")
    key = sm.SM2PrivateKey.generate()
    msg = b"interop with openssl"
    d = tmp_path  # type: ignore[assignment]
    (d / "pub.pem").write_text(key.public_key.to_pem())  # type: ignore[operator]
    (d / "msg").write_bytes(msg)  # type: ignore[operator]
    (d / "sig").write_bytes(key.sign(msg))  # type: ignore[operator]
    r = subprocess.run(
        [
            "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(d / "pub.pem"),  # type: ignore[operator]
            "-rawin", "-digest", "sm3", "-pkeyopt", "distid:1234567812345678",
            "-in", str(d / "msg"), "-sigfile", str(d / "sig"),  # type: ignore[operator]
        ],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "3007020101020101" + "00",  # trailing byte after the sequence
        "30070201010202ff01",  # negative s
        "300702020001020101",  # r not minimal (00 before a byte < 0x80)
        "30818602010102810101",  # long-form length
        "3006020101040101",  # s is an OCTET STRING
        "3006020101020100",  # s == 0
        "30060201010201",  # truncated
    ],
)
def test_sig_der_strict_rejections(bad: str) -> None:
    with pytest.raises(MalformedSignature):
        sm.sig_der_to_raw(bytes.fromhex(bad))


def test_sig_der_raw_agree_with_independent_encoder() -> None:
    """Our DER matches cryptography's encode_dss_signature for many (r, s), incl. high-bit values."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    for _ in range(200):
        raw = sm.random_bytes(64)
        r, s = int.from_bytes(raw[:32], "big") % (sm.N - 1) + 1, int.from_bytes(raw[32:], "big") % (sm.N - 1) + 1
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        der = sm.sig_raw_to_der(raw)
        assert der == encode_dss_signature(r, s)
        assert decode_dss_signature(der) == (r, s)
        assert sm.sig_der_to_raw(der) == raw
    small = (1).to_bytes(32, "big") + (0x80).to_bytes(32, "big")
    assert sm.sig_raw_to_der(small) == encode_dss_signature(1, 0x80)


@pytest.mark.usefixtures("sm2_backend")
def test_sm2_signatures_interop_with_tongsuo_both_ways() -> None:
    """A second independent implementation: Tongsuo (OpenSSL fork) via tongsuopy, default user id."""
    ec = pytest.importorskip("tongsuopy.crypto.asymciphers.ec")
    from tongsuopy.crypto import hashes, serialization

    theirs = ec.generate_private_key(ec.SM2())
    sig = theirs.sign(b"hello", ec.ECDSA(hashes.SM3()))
    pem = theirs.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = sm.SM2PublicKey.from_pem(pem)
    assert pub.verify(b"hello", sig)
    assert not pub.verify(b"hellO", sig)
    d = theirs.private_numbers().private_value.to_bytes(32, "big")
    assert sm.SM2PrivateKey.from_bytes(d).public_key == pub
    ours = sm.SM2PrivateKey.generate()
    tpub = serialization.load_pem_public_key(ours.public_key.to_pem().encode())
    tpub.verify(ours.sign(b"hello"), b"hello", ec.ECDSA(hashes.SM3()))  # raises if invalid
