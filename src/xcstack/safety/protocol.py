"""Wire models of the safety capability's one read-only endpoint (`GET /v1/safety/policies`).

The safety capability raises no errors of its own over HTTP (a blocked request is the gateway's
`content_blocked`), so there is no error enum here."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PolicyView(BaseModel):
    name: str
    keys: list[str] = Field(description="API key ids the policy applies to (empty: any)")
    groups: list[str] = Field(description="roles the policy applies to (empty: any)")
    models: list[str]
    routes: list[str]
    input: list[str] = Field(description="detectors run on inputs: `list:<name>`, `pii`, `pii:<kind>`")
    output: list[str] = Field(description="detectors run on answers")
    action: str = Field(description="block, mask or flag")
    actions: dict[str, str] = Field(description="per-detector overrides of `action`")


class ListView(BaseModel):
    """A keyword list as loaded now (after the last SIGHUP reload): never its words."""

    name: str
    category: str
    sha256: str = Field(description="of the file's bytes, as every record it causes carries")
    words: int = Field(description="how many words it holds")
    actions: list[str] = Field(description="`<policy>:<input|output>:<action>` for every policy that runs it")


class LabelView(BaseModel):
    enabled: bool = Field(description="configured on")
    active: bool = Field(description="answers are being signed (the crypto capability is on)")
    provider: str
    service: str
    key: str = Field(description="the crypto key (SM2) that signs labels")
    explicit_text: str | None
    explicit_in_answer: bool
    batch_max: int


class SafetyPolicies(BaseModel):
    enabled: bool
    policies: list[PolicyView]
    lists: list[ListView]
    label: LabelView
    mask: str
    evidence_key: str = Field(description="`secret:NAME` reference of the evidence HMAC key, or `random per start`")
