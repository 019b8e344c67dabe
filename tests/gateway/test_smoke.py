from __future__ import annotations

import openai

from tests.gateway.conftest import GatewayServer


def test_chat_roundtrip(gateway: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-test", max_retries=0)
    r = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content == "xxx xxx xxx "
    chunks = list(client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "xxx xxx xxx "
