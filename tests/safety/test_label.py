"""Content labels signed in micro-batches: the Merkle tree against RFC 9162's algorithm, a label
verifies on its own and against the batch log, and a tampered label, a tampered proof or a wrong key
fail; concurrent labels share one signature, a lone one is signed at once."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xcstack.crypto.primitives.sm2 import SM2PrivateKey
from xcstack.safety.label import Label, Labeler, find_batch, leaf_hash, merkle, root_from_path, verify


class KeySigner:
    def __init__(self) -> None:
        self.sk = SM2PrivateKey.generate()
        self.calls = 0

    async def sign(self, key: str, data: bytes) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.005)  # a signature takes time: labels asked for meanwhile join the next batch
        return self.sk.sign(data)

    @property
    def pem(self) -> str:
        return self.sk.public_key.to_pem()


def _issue(labeler: Labeler, n: int) -> list[Label]:
    async def go() -> list[Label]:
        return list(await asyncio.gather(*(labeler.issue(f"req-{i}", "m") for i in range(n))))
    return asyncio.run(go())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64, 100])
def test_every_inclusion_proof_leads_to_the_root(n: int) -> None:
    leaves = [leaf_hash(str(i).encode()) for i in range(n)]
    root, paths = merkle(leaves)
    for i, path in enumerate(paths):
        assert root_from_path(leaves[i], i, n, path) == root
        if n > 1:
            try:  # the index is bound: another one leads elsewhere, or the path does not fit it
                assert root_from_path(leaves[i], (i + 1) % n, n, path) != root
            except ValueError:
                pass
            with pytest.raises(ValueError):
                root_from_path(leaves[i], i, n, path[:-1])


def test_batched_labels_verify_and_tampering_fails(tmp_path: Path) -> None:
    signer = KeySigner()
    labeler = Labeler(signer, "content-label", "p", "s", None, tmp_path / "labels", batch_max=16)
    labels = _issue(labeler, 40)
    assert signer.calls < 40 and labeler.batches == signer.calls  # batched: fewer signatures than labels
    assert max(lb.proof["size"] for lb in labels) <= 16
    for lb in labels:
        assert verify(lb.header, signer.pem)["request_id"] == lb.fields["request_id"]
        assert verify(json.dumps({"xc_label": lb.body()}), signer.pem, tmp_path / "labels")
    lb = next(x for x in labels if x.proof["size"] > 2)
    # a tampered label field
    with pytest.raises(ValueError, match="does not verify"):
        verify(json.dumps({**lb.body(), "model": "other"}), signer.pem)
    # a tampered proof: another index, a changed path hash, a shortened path, another batch size
    for change in ({"index": (lb.proof["index"] + 1) % lb.proof["size"]},
                   {"path": [base64.urlsafe_b64encode(b"\x00" * 32).decode().rstrip("="), *lb.proof["path"][1:]]},
                   {"path": lb.proof["path"][:-1]}, {"size": lb.proof["size"] + 1}, {"batch": "x-1"}):
        with pytest.raises(ValueError):
            verify(json.dumps({**lb.fields, "proof": {**lb.proof, **change}}), signer.pem)
    # a wrong key
    with pytest.raises(ValueError, match="does not verify"):
        verify(lb.header, SM2PrivateKey.generate().public_key.to_pem())
    # the batch log holds the batch; a label whose batch is not logged fails with the log asked for
    rec = find_batch(tmp_path / "labels", lb.proof["batch"])
    assert rec is not None and rec["size"] == lb.proof["size"] and rec["sig"] == lb.proof["sig"]
    other = Labeler(signer, "content-label", "p", "s", None, None)
    stray = _issue(other, 1)[0]
    assert verify(stray.header, signer.pem)
    with pytest.raises(ValueError, match="not in the batch log"):
        verify(stray.header, signer.pem, tmp_path / "labels")


def test_a_lone_label_is_signed_at_once_and_errors_reach_every_waiter() -> None:
    signer = KeySigner()
    labeler = Labeler(signer, "k", "p", "s", "本内容由人工智能生成")
    (one,) = _issue(labeler, 1)
    assert one.proof["size"] == 1 and one.proof["path"] == [] and one.fields["explicit"] == "本内容由人工智能生成"
    assert verify(one.header, signer.pem)

    class Broken:
        async def sign(self, key: str, data: bytes) -> bytes:
            raise RuntimeError("hsm down")

    bad = Labeler(Broken(), "k", "p", "s", None)

    async def go() -> list[Any]:
        return list(await asyncio.gather(*(bad.issue("r", "m") for _ in range(3)), return_exceptions=True))
    assert [type(e) for e in asyncio.run(go())] == [RuntimeError] * 3


def test_cli_verify_and_batch(tmp_path: Path) -> None:
    signer = KeySigner()
    labeler = Labeler(signer, "content-label", "p", "s", None, tmp_path / "labels")
    lb = _issue(labeler, 3)[1]
    pem = tmp_path / "label.pem"
    pem.write_text(signer.pem)
    cmd = [sys.executable, "-m", "xcstack", "label"]
    ok = subprocess.run([*cmd, "verify", "--public-key", str(pem), "--batch-log", str(tmp_path / "labels"),
                         lb.header], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"valid": true' in ok.stdout, ok.stderr
    tampered = json.dumps({**lb.body(), "request_id": "req-9"})
    bad = subprocess.run([*cmd, "verify", "--public-key", str(pem), tampered], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "INVALID" in bad.stderr
    got = subprocess.run([*cmd, "batch", lb.proof["batch"], "--dir", str(tmp_path / "labels")], capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0 and json.loads(got.stdout)["root"]


def test_unary_answer_gets_the_label_without_a_reparse_and_it_verifies() -> None:
    from xcstack.safety.evidence import Where
    from xcstack.safety.hooks import RequestSafety

    signer = KeySigner()
    labeler = Labeler(signer, "k", "p", "s", None)

    async def go(payload: bytes) -> tuple[bytes, dict[str, str]]:
        rs = RequestSafety(None, None, Where("r1", "key", "m", "/v1/chat/completions"), None,  # type: ignore[arg-type]
                           asyncio.ensure_future(labeler.issue("r1", "m")))
        assert rs.headers == {}  # still being signed: the answer waits for it
        out = await rs.answer(payload)
        return out, rs.headers

    up = b' {"id":"x","choices":[{"message":{"content":"hi"}}]}'
    out, headers = asyncio.run(go(up))
    obj = json.loads(out)
    assert obj["id"] == "x" and obj["choices"] == [{"message": {"content": "hi"}}]
    assert verify(json.dumps(obj), signer.pem)["request_id"] == "r1" and verify(headers["x-xc-content-label"],
                                                                                signer.pem)
    assert json.loads(asyncio.run(go(b"{}"))[0])["xc_label"]["model"] == "m"


EXPLICIT = "\n\n本内容由人工智能生成"


def test_explicit_label_in_unary_answers_after_the_filters() -> None:
    from tests.safety.conftest import make_engine
    from xcstack.safety.evidence import Where
    from xcstack.safety.hooks import RequestSafety

    signer = KeySigner()
    labeler = Labeler(signer, "k", "p", "s", EXPLICIT.strip())
    eng = make_engine("mask")

    async def go(plan: Any, payload: bytes) -> dict[str, Any]:
        rs = RequestSafety(eng, plan, Where("r1", "key", "m", "/v1/chat/completions"), None,
                           await labeler.issue("r1", "m"), EXPLICIT)
        return dict(json.loads(await rs.answer(payload)))

    chat = b'{"choices":[{"index":0,"message":{"content":"he said falun"}},{"index":1,"message":{"content":"ok"}}]}'
    obj = asyncio.run(go(None, chat))
    assert [c["message"]["content"] for c in obj["choices"]] == ["he said falun" + EXPLICIT, "ok" + EXPLICIT]
    assert obj["xc_label"]["explicit"] == EXPLICIT.strip()
    obj = asyncio.run(go(eng.plan("k", (), "m", "/v1/chat/completions"), chat))  # masked, then labelled
    assert obj["choices"][0]["message"]["content"] == "he said *****" + EXPLICIT
    obj = asyncio.run(go(None, b'{"choices":[{"index":0,"text":"done"}]}'))
    assert obj["choices"][0]["text"] == "done" + EXPLICIT


@pytest.mark.parametrize("filtered", [False, True])
def test_explicit_label_is_the_last_delta_of_each_streamed_choice(filtered: bool) -> None:
    from tests.safety.conftest import make_engine
    from tests.safety.test_stream import _sse, _text
    from xcstack.safety.stream import SseFilter

    eng = make_engine("mask")
    rules = eng.plan("k", (), "m", "/v1/chat/completions").output if filtered else None  # type: ignore[union-attr]
    flt = SseFilter(eng, rules, {"label": "AIGC"}, EXPLICIT)
    raw = _sse(["我说", "法轮", "功了"])
    out = b"".join(flt.feed(ev + b"\n\n") for ev in raw.split(b"\n\n") if ev)
    text, done = _text(out)
    assert done and text == ("我说***了" if filtered else "我说法轮功了") + EXPLICIT
    events = [e for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    last = json.loads(events[-1][6:])["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"]["content"].endswith(EXPLICIT)
