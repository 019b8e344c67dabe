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


# -- fast paths (issue 19: scan speed) -------------------------------------------------------------
def test_ascii_fast_path_normalises_like_the_table() -> None:
    text = "F.A-L_U N\tfalun\x00 Hello, World! 123"
    assert text.isascii()
    assert normalise(text) == "falunfalunhelloworld123"
    assert normalise(text) == "".join(normalise(c + "中")[:-1] for c in text)  # the per-character table


@pytest.mark.parametrize("length", [10, NUMPY_FROM + 1])
def test_mixed_text_matches_the_table_per_character(length: int) -> None:
    text = ("ＦａＬ 輪\u200b功。Ab-1２" * length)[:length]
    assert normalise(text) == "".join(normalise(c + "中")[:-1] for c in text)


def _pieces() -> list[str]:
    wide = ["手机：１３８００１３８０００。", "１１０１０５１９４９１２３１００２Ｙ"]
    return [*(v for _, v in TRUE_CASES), *FALSE_CASES, *wide]


def test_long_texts_find_the_same_numbers_as_short_ones() -> None:
    """Above NUMPY_PII_FROM the stops come from numpy over whole digit runs: same hits, same positions."""
    filler = "天气很好，版本 2.4.1 于 2024-05-01 发布；价格 12.50 元。"
    short: list[tuple[str, str]] = []
    parts: list[str] = []
    for value in _pieces():
        piece = f"{filler}{value} "
        short += [(h.kind, piece[h.start:h.end]) for h in pii.scan(piece)]
        parts.append(piece)
    text = "".join(parts) * (pii.NUMPY_PII_FROM // len("".join(parts)) + 1)
    assert len(text) >= pii.NUMPY_PII_FROM and pii._stops_numpy(text) is not None
    long = [(h.kind, text[h.start:h.end]) for h in pii.scan(text)]
    assert long == short * (len(long) // len(short)) and long
    assert pii._stops_numpy(text) == pii._stops_regex(text)


def test_numpy_and_regex_stops_agree_on_random_text() -> None:
    import random

    rnd = random.Random(19)
    alphabet = [*"0123456789 -.@:+abcfAFX中，", "１", "：", "＠", "．", "。", "13800138000", "::1", "1.2.3.4"]
    for _ in range(200):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 300)))
        text = text * (pii.NUMPY_PII_FROM // len(text) + 1)
        if text.isascii():
            text += "中"
        assert pii._stops_numpy(text) == pii._stops_regex(text), text[:300]


def test_bad_check_digits_and_full_width_in_otherwise_ascii_text() -> None:
    for text in ("id 11010519491231002Y ok", "card 4111111111111112 ok", "id １１０１０５１９４９１２３１００２Ｙ ok"):
        assert pii.scan(text) == [] and pii.scan(text * 400) == []
    text = "tel １３８００１３８０００ ok"
    assert [(h.kind, text[h.start:h.end]) for h in pii.scan(text)] == [("mobile", "１３８００１３８０００")]


def test_a_number_after_a_chinese_full_stop_in_a_folded_text() -> None:
    """A full-width character anywhere folds 。 to `.` (for addresses); a number right after a sentence's
    。 is still one (it used to be skipped as the tail of a dotted thing)."""
    text = "电话：１３８００１３８０００。13912345678"
    assert [(h.kind, text[h.start:h.end]) for h in pii.scan(text)] == [("mobile", "１３８００１３８０００"),
                                                                     ("mobile", "13912345678")]
    assert [h.kind for h in pii.scan("地址 10。0。0。1 好")] == []  # no full-width trigger: not folded (as before)
    assert [h.kind for h in pii.scan("地址：10。0。0。1 好")] == ["ip"]


def test_a_word_is_classified_once() -> None:
    text = "4111111111111111+1234567"  # the stop inside the same word used to add the card again
    assert [(h.kind, h.start, h.end) for h in pii.scan(text)] == [("bank_card", 0, 16)]


def test_digit_heavy_text_scans_in_linear_time() -> None:
    """A text that sent the old stop loop back over its words at every digit (minutes) takes ms."""
    import time

    text = "a42024-05-01A8a@b.cn12345+2001:db8::8a2e:370:7334a@b.cn791350100M000100Y43f1212123431291380013800000"
    t = time.process_time()
    assert [h.kind for h in pii.scan(text)] == ["email", "email"]
    assert time.process_time() - t < 0.5
