"""Detectors: every evasion normalisation undoes, every personal-information kind with true and false
cases (a number failing its check is not flagged), positions mapped back to the original text."""

from __future__ import annotations

import pytest

from xcstack.safety import pii
from xcstack.safety.engine import ContentSafety
from xcstack.safety.keywords import Keywords, ListError
from xcstack.safety.normalise import NUMPY_FROM, index_map, normalise


@pytest.mark.parametrize("text", [
    "法轮功",  # plain
    "法 轮 功",  # spaces
    "法.轮,功",  # punctuation
    "法\u200b轮\u200d功",  # zero-width characters
    "法\u3000轮　功",  # ideographic spaces
    "法輪功",  # traditional
    "FALUN", "ＦＡＬＵＮ", "Ｆ a l u n", "f-a-l-u-n",  # case, full width, inserted characters
])
def test_every_evasion_is_caught_and_mapped_back(engine: ContentSafety, text: str) -> None:
    rules = engine.plan("k", (), "m", "/v1/chat/completions").input  # type: ignore[union-attr]
    assert rules is not None
    wrapped = "前面" + text + "后面"
    found = engine.scan(wrapped, rules)
    assert [f.detector for f in found] == ["list:bad"]
    assert wrapped[found[0].start:found[0].end] == text  # the original span, separators inside it
    assert engine.apply(wrapped, found) == "前面" + "*" * len(text) + "后面"


def test_clean_text_and_partial_words_are_not_flagged(engine: ContentSafety) -> None:
    rules = engine.plan("k", (), "m", "/v1/chat/completions").input  # type: ignore[union-attr]
    assert rules is not None
    assert engine.scan("法轮 是佛教用语，功夫很好；Falu n? no: Falu", rules) == [] or all(
        f.detector != "list:bad" for f in engine.scan("法轮 是佛教用语，Falu", rules))


def test_long_texts_take_the_numpy_path_with_the_same_result() -> None:
    text = ("Ｆａ lun 法輪\u200b功 ok. " * (NUMPY_FROM // 10))
    assert len(text) > NUMPY_FROM
    short = "".join(normalise(text[i:i + 100]) for i in range(0, len(text), 100))
    assert normalise(text) == short
    imap = index_map(text)
    assert len(imap) == len(normalise(text))


def test_list_identity_and_bad_files(tmp_path: object) -> None:
    kw = Keywords([("a", "cat", "词一\n词二\n".encode()), ("b", "cat2", "词二\n".encode())])
    assert kw.lists[0].sha256 != kw.lists[1].sha256 and len(kw.lists[0].sha256) == 64
    hits = kw.scan(normalise("有词二"))
    assert [h.lists for h in hits] == [(0, 1)]
    with pytest.raises(ListError, match="not UTF-8"):
        Keywords([("x", "c", b"\xff\xfe\xfa")])
    with pytest.raises(ListError, match="cannot read"):
        Keywords.from_files([("x", "c", __import__("pathlib").Path("/nonexistent/list.txt"))])


# -- personal information ------------------------------------------------------------------------
TRUE_CASES = [
    ("id_card", "11010519491231002X"),
    ("mobile", "13800138000"), ("mobile", "+8613912345678"), ("mobile", "138-0013-8000"),
    ("bank_card", "6222020000000000000"), ("bank_card", "4111 1111 1111 1111"), ("bank_card", "4111-1111-1111-1111"),
    ("uscc", "91350100M000100Y43"), ("ip", "10.0.0.1"),
    ("email", "zhang.san+x@example.com.cn"),
    ("ip", "192.168.10.1"), ("ip", "2001:db8::8a2e:370:7334"), ("ip", "::1"),
]
FALSE_CASES = [
    "11010519491231002Y",  # bad ID check character
    "110105194913310021",  # month 13
    "12800138000",  # not a mobile prefix
    "4111111111111112",  # Luhn fails
    "91350100M000100Y44",  # bad USCC check character
    "user@localhost", "a@b.c1",  # no dotted domain / numeric TLD
    "999.1.1.1", "1:2",  # not addresses
    "订单号 2024010112345",  # an ordinary long number
    "2024-05-01", "v2.4.1", "12:30:45",  # dates, versions, times: never reach the detectors
]


@pytest.mark.parametrize(("kind", "value"), TRUE_CASES)
def test_pii_true_cases(kind: str, value: str) -> None:
    text = f"请联系 {value} 谢谢"
    hits = pii.scan(text)
    assert [(h.kind, text[h.start:h.end]) for h in hits] == [(kind, value)]


@pytest.mark.parametrize("value", FALSE_CASES)
def test_pii_false_cases(value: str) -> None:
    assert pii.scan(f"内容 {value} 结束") == []


def test_pii_full_width_digits_keep_positions() -> None:
    text = "手机：１３８００１３８０００。"
    hits = pii.scan(text)
    assert [(h.kind, text[h.start:h.end]) for h in hits] == [("mobile", "１３８００１３８０００")]


def test_pii_kinds_filter() -> None:
    text = "13800138000 a@example.com"
    assert [h.kind for h in pii.scan(text, frozenset({"email"}))] == ["email"]


def test_checksums_directly() -> None:
    assert pii.id_card_valid("11010519491231002X") and not pii.id_card_valid("11010519491231002x".upper()[:-1] + "1")
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111121")
    assert pii.uscc_valid("91350100M000100Y43") and not pii.uscc_valid("91350100M000100Y4O")
