"""Usage governance: groups' quotas, the usage ledger and cost (docs/usage.md)."""
