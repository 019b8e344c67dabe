"""`ContentSafety`: what the safety capability gives the gateway (`Services.safety`).

Policies resolve to a `Plan` per (key, groups, model, route) — cached — with the detectors of each
direction and their actions; `scan` finds matches in one text (keywords on the normalised text, mapped
back to the original; personal information on the width-folded text), `apply` masks them. The hook
functions the gateway calls (`check_request`, `filter_answer`, `stream`) are in `hooks.py`; the
evidence (audit records, metrics) in `evidence.py`.

Several policies may apply to one request: all do, and for a detector named by more than one the
strongest action wins (block > mask > flag).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from xcstack.crypto.recipes import hmac_sm3
from xcstack.safety import pii
from xcstack.safety.keywords import Keywords
from xcstack.safety.normalise import index_map, normalise, original_span
from xcstack.safety.settings import PII_KINDS, SafetySettings

log = logging.getLogger("xcstack.safety")

STRENGTH = {"flag": 0, "mask": 1, "block": 2}
PLAN_CACHE = 4096


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    policy: str


@dataclass(frozen=True, slots=True)
class Rules:
    """One direction's detectors: list name -> rule, pii kind -> rule."""

    lists: dict[str, Rule]
    pii: dict[str, Rule]

    @property
    def longest_pii(self) -> int:
        return 64 if self.pii else 0


@dataclass(frozen=True, slots=True)
class Plan:
    input: Rules | None
    output: Rules | None


@dataclass(frozen=True, slots=True)
class Finding:
    """One match, with where it is in the original text; the text itself stays with the caller."""

    detector: str  # list:<name> | pii:<kind>
    category: str
    action: str
    policy: str
    start: int
    end: int
    list_sha256: str | None = None
    field: str = ""  # where in the request or answer (e.g. `messages[1].content`)
    mac: str = ""  # HMAC-SM3 of the matched text under the evidence key (the text itself is never kept)


def _merge(into: dict[str, Rule], name: str, rule: Rule) -> None:
    old = into.get(name)
    if old is None or STRENGTH[rule.action] > STRENGTH[old.action]:
        into[name] = rule


class ContentSafety:
    def __init__(self, settings: SafetySettings, keywords: Keywords | None = None) -> None:
        self.settings = settings
        self.keywords = keywords if keywords is not None else self.load_lists()
        self._plans: OrderedDict[tuple[str, tuple[str, ...], str, str], Plan | None] = OrderedDict()
        self._reload_lock = threading.Lock()
        self.evidence_key = os.urandom(32)  # replaced at start by `safety.evidence_key` when set
        self.labeler: object | None = None  # `label.Labeler` when labels are on

    # -- lists ----------------------------------------------------------------------------------
    def load_lists(self) -> Keywords:
        """Read every configured list (raises ListError naming `safety.lists[i]`)."""
        specs = [(x.name, x.category, Path(x.path)) for x in self.settings.lists]
        try:
            return Keywords.from_files(specs)
        except ValueError as exc:
            i = next((i for i, x in enumerate(self.settings.lists) if str(exc).startswith(x.name + ":")), 0)
            raise type(exc)(f"safety.lists[{i}].path: {exc}") from None

    async def reload(self) -> bool:
        """Re-read the lists off the loop and swap them in at once: requests in flight keep the old
        automaton (immutable), later ones get the new one. A list that fails to load keeps the old
        lists (logged), so a bad edit never takes filtering down."""
        try:
            fresh = await asyncio.to_thread(self._load_locked)
        except ValueError as exc:
            log.error("safety lists not reloaded, keeping the previous ones: %s", exc)
            return False
        self.keywords = fresh
        log.info("safety lists reloaded: %s", ", ".join(f"{k.name}={k.sha256[:12]}" for k in fresh.lists))
        return True

    def _load_locked(self) -> Keywords:
        with self._reload_lock:
            return self.load_lists()

    # -- policies -------------------------------------------------------------------------------
    def plan(self, key: str, groups: tuple[str, ...], model: str, route: str) -> Plan | None:
        """The detectors for this request (None: no policy applies)."""
        ck = (key, groups, model, route)
        try:
            found = self._plans[ck]
            self._plans.move_to_end(ck)
            return found
        except KeyError:
            pass
        found = self._resolve(key, groups, model, route)
        self._plans[ck] = found
        if len(self._plans) > PLAN_CACHE:
            self._plans.popitem(last=False)
        return found

    def _resolve(self, key: str, groups: tuple[str, ...], model: str, route: str) -> Plan | None:
        rules: dict[str, tuple[dict[str, Rule], dict[str, Rule]]] = {"input": ({}, {}), "output": ({}, {})}
        any_policy = False
        for pol in self.settings.policies:
            if pol.keys and key not in pol.keys:
                continue
            if pol.groups and not set(groups) & set(pol.groups):
                continue
            if pol.models and model not in pol.models:
                continue
            if pol.routes and route not in pol.routes:
                continue
            any_policy = True
            for direction in ("input", "output"):
                lists, kinds = rules[direction]
                for det in getattr(pol, direction):
                    action = pol.actions.get(det, pol.actions.get("pii", pol.action) if det.startswith("pii")
                                             else pol.action)
                    rule = Rule(action, pol.name)
                    kind, _, name = det.partition(":")
                    if kind == "list":
                        _merge(lists, name, rule)
                    elif name:
                        _merge(kinds, name, rule)
                    else:
                        for k in PII_KINDS:
                            _merge(kinds, k, Rule(pol.actions.get(f"pii:{k}", action), pol.name))
        if not any_policy:
            return None

        def pack(direction: str) -> Rules | None:
            lists, kinds = rules[direction]
            return Rules(lists, kinds) if lists or kinds else None

        plan = Plan(pack("input"), pack("output"))
        return plan if plan.input or plan.output else None

    # -- scanning -------------------------------------------------------------------------------
    def scan(self, text: str, rules: Rules) -> list[Finding]:
        """Every match of `rules`' detectors in `text` (offsets in `text`)."""
        out: list[Finding] = []
        kw = self.keywords
        if rules.lists and kw.automaton is not None:
            wanted = frozenset(i for i, kl in enumerate(kw.lists) if kl.name in rules.lists)
            hits = kw.scan(normalise(text), wanted) if wanted else []
            if hits:
                imap = index_map(text)
                for hit in hits:
                    best: tuple[Rule, int] | None = None
                    for li in hit.lists:
                        rule = rules.lists[kw.lists[li].name]
                        if best is None or STRENGTH[rule.action] > STRENGTH[best[0].action]:
                            best = (rule, li)
                    assert best is not None
                    rule, li = best
                    kl = kw.lists[li]
                    start, end = original_span(imap, hit.start, hit.end)
                    out.append(Finding(f"list:{kl.name}", kl.category, rule.action, rule.policy, start, end,
                                       kl.sha256))
        if rules.pii:
            for ph in pii.scan(text, frozenset(rules.pii)):
                rule = rules.pii[ph.kind]
                out.append(Finding(f"pii:{ph.kind}", f"pii.{ph.kind}", rule.action, rule.policy, ph.start, ph.end))
        if out:
            key = self.evidence_key
            out = [dataclasses.replace(f, mac=hmac_sm3(key, text[f.start:f.end].encode("utf-8")).hex()) for f in out]
        return out

    def holdback(self, rules: Rules) -> int:
        """Normalised characters a stream must hold back so a keyword split across chunks is caught."""
        return max(self.keywords.longest - 1, 0) if rules.lists else 0

    def apply(self, text: str, findings: list[Finding]) -> str:
        """`text` with every `mask` finding's characters replaced by the mask."""
        spans = sorted((f.start, f.end) for f in findings if f.action == "mask")
        if not spans:
            return text
        mask = self.settings.mask
        parts: list[str] = []
        pos = 0
        for start, end in spans:
            start = max(start, pos)
            if end <= start:
                continue
            parts.append(text[pos:start])
            parts.append(mask * (end - start))
            pos = end
        parts.append(text[pos:])
        return "".join(parts)


def blocking(findings: list[Finding]) -> Finding | None:
    return next((f for f in findings if f.action == "block"), None)
