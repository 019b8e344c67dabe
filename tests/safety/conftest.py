from __future__ import annotations

import pytest

from xcstack.safety.engine import ContentSafety
from xcstack.safety.keywords import Keywords
from xcstack.safety.settings import SafetySettings

WORDS = "法轮功\nFalun\n# a comment\n\n坏词\n"


def make_engine(action: str = "mask", words: str = WORDS, **extra: object) -> ContentSafety:
    s = SafetySettings.model_validate({
        "lists": [{"name": "bad", "path": "/dev/null", "category": "politics"}],
        "policies": [{"name": "p", "input": ["list:bad", "pii"], "output": ["list:bad", "pii"], "action": action,
                      **extra}],
    })
    return ContentSafety(s, Keywords([("bad", "politics", words.encode())]))


@pytest.fixture()
def engine() -> ContentSafety:
    return make_engine()


from tests.gateway.conftest import mock, mocks  # noqa: E402,F401  (mock upstream fixtures)
