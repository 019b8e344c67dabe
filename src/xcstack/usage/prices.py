"""The price table: per model, input and output price per million tokens; its version is a hash of the
table, so a ledger record names the prices it was charged at (`usage_price_versions` keeps each table)."""

from __future__ import annotations

import hashlib
import json

from xcstack.usage.settings import Price

MICRO = 1_000_000  # cost counters are integers in micro-units of the currency


class PriceTable:
    def __init__(self, prices: dict[str, Price], currency: str) -> None:
        self.currency = currency
        self._p = {m: (p.input, p.output) for m, p in prices.items()}
        canon = json.dumps({"currency": currency, "prices": {m: list(v) for m, v in sorted(self._p.items())}},
                           sort_keys=True)
        self.table_json = canon
        self.version = hashlib.sha256(canon.encode()).hexdigest()[:12]

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """Currency units for these tokens (0 for a model without a price)."""
        p = self._p.get(model)
        if p is None:
            return 0.0
        return (input_tokens * p[0] + output_tokens * p[1]) / 1_000_000

    def micro(self, model: str, input_tokens: int, output_tokens: int) -> int:
        p = self._p.get(model)
        if p is None:
            return 0
        return round(input_tokens * p[0] + output_tokens * p[1])  # (tokens/1e6 * price) * 1e6
