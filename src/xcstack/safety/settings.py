"""The `[safety]` section: keyword lists, policies, evidence and content labels (docs/safety.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Action = Literal["block", "mask", "flag"]
PII_KINDS = ("id_card", "mobile", "bank_card", "uscc", "email", "ip")


class ListSettings(BaseModel):
    """One keyword list file: one word a line; reloaded on SIGHUP."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: Path
    category: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$",
                          description="named in `content_blocked` errors, records and metrics")


class PolicySettings(BaseModel):
    """Which detectors run on a request's input and on its answer, and what a match does.

    A policy applies to a request when each of its non-empty `keys`, `groups`, `models`, `routes`
    contains the request's (API key id, one of the principal's roles, model, path); empty: any.
    Detectors: `list:<name>` (a keyword list), `pii` (every personal-information detector) or
    `pii:<kind>` (id_card, mobile, bank_card, uscc, email, ip)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    keys: list[str] = []
    groups: list[str] = []
    models: list[str] = []
    routes: list[str] = []
    input: list[str] = Field(default=[], description="detectors run on prompts, messages and embedding/rerank inputs")
    output: list[str] = Field(default=[], description="detectors run on answers, streamed or not")
    action: Action = "block"
    actions: dict[str, Action] = Field(default={}, description="per detector (`list:x`, `pii:mobile`, `pii`): "
                                       "overrides `action`")


class LabelSettings(BaseModel):
    """GB 45438-2025 implicit label on every generated answer (`X-XC-Content-Label` header and an
    `xc_label` body field), signed with the service's SM2 key through the crypto capability."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    provider: str = Field(default="xcstack", max_length=128, description="the service provider's name")
    service: str = Field(default="xcstack", max_length=128, description="the service's name")
    key: str = Field(default="content-label", description="crypto key (kind sm2) that signs labels; created "
                     "at start when missing")
    explicit_text: str | None = Field(default=None, max_length=256,
                                      description="explicit label appended to answers meant for people, e.g. "
                                      "\"本内容由人工智能生成\"")
    explicit_in_answer: bool = Field(default=False, description="also append the explicit label to the answer "
                                     "text (a blank line, then explicit_text): unary, to each choice's content; "
                                     "streamed, as a last delta of each choice before its finish")
    batch_max: int = Field(default=256, ge=1, le=4096, description="labels signed by one SM2 signature at most "
                           "(a Merkle root over them; each label carries its inclusion proof)")
    log_dir: Path | None = Field(default=None, description="batch log (one JSON line per signed batch); default "
                                 "<data_dir>/labels")


class SafetySettings(BaseModel):
    """Content safety (docs/safety.md): keyword lists and personal-information detectors on inputs and
    answers, per policy; audited evidence; signed content labels."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="off: no filtering and no labels")
    lists: list[ListSettings] = Field(default=[], description="keyword list files (`[[safety.lists]]`)")
    policies: list[PolicySettings] = Field(default=[], description="which detectors run where, and the action "
                                           "(`[[safety.policies]]`); none: nothing is filtered")
    mask: str = Field(default="*", min_length=1, max_length=16, description="replaces each masked character")
    evidence_key: str | None = Field(default=None, description="`secret:NAME`: the HMAC-SM3 key of the match "
                                     "digests in audit records; unset: a random key per start (digests then "
                                     "only compare within one run)")
    label: LabelSettings = LabelSettings()

    @model_validator(mode="after")
    def _check(self) -> SafetySettings:
        names = [x.name for x in self.lists]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"safety.lists[{i}].name: {name!r} is used twice")
        known = set(names)
        for i, pol in enumerate(self.policies):
            for field in ("input", "output"):
                for j, det in enumerate(getattr(pol, field)):
                    problem = detector_problem(det, known)
                    if problem:
                        raise ValueError(f"safety.policies[{i}].{field}[{j}]: {problem}")
            for det in pol.actions:
                problem = detector_problem(det, known)
                if problem:
                    raise ValueError(f"safety.policies[{i}].actions.{det}: {problem}")
        return self


def detector_problem(det: str, lists: set[str]) -> str | None:
    """Why `det` names no detector (None: it does)."""
    if det == "pii":
        return None
    kind, _, name = det.partition(":")
    if kind == "pii":
        return None if name in PII_KINDS else f"{det!r}: no such detector (pii kinds: {', '.join(PII_KINDS)})"
    if kind == "list":
        return None if name in lists else f"{det!r}: no list named {name!r} in safety.lists"
    return f"{det!r}: a detector is `list:<name>`, `pii` or `pii:<kind>`"
