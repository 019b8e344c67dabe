"""Schema fuzzing: schemathesis against a live `xcstack serve` with every capability and security on.

Every operation of /openapi.json is called with generated valid and invalid input, authenticated:
no answer may be a 5xx, every answer must conform to its documented status, media type and schema
(so every 4xx is in the JSON error model, with a documented code), an undeclared method must get
405, and schema-invalid input must be refused.

Bounded by work, not by time: schemathesis' coverage phase runs in full (every operation with its boundary
and schema-invalid values: deterministic, what found the bugs so far, e.g. a huge `after_seq` answered 500),
then `XC_TEST_FUZZ_EXAMPLES` (10) random cases per operation and phase. A time budget made the run last the
whole budget however early everything was covered, and cover less on a busy machine. A longer manual run:
`XC_TEST_FUZZ_EXAMPLES=200 XC_TEST_FUZZ_SECONDS=1800 .venv/bin/python -m pytest tests/contract/test_schema_fuzz.py`
(with SECONDS, fuzzing and stateful testing repeat until the budget is spent; see tests/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.contract.stack import FullStack

EXAMPLES = int(os.environ.get("XC_TEST_FUZZ_EXAMPLES", "10"))
BUDGET_S = float(os.environ.get("XC_TEST_FUZZ_SECONDS", "0"))  # 0: no time budget, the examples bound the run
# use_after_free / ensure_resource_availability / ignored_auth need stateful links this API does not
# declare; positive_data_acceptance fails on valid input that names a resource that does not exist (404)
EXCLUDED_CHECKS = "use_after_free,ensure_resource_availability,ignored_auth,positive_data_acceptance"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    from tests.inference.conftest import default_model_repo

    st = FullStack(tmp_path_factory.mktemp("fuzz"), default_model_repo(tmp_path_factory), server="granian").start()
    try:
        yield st
    finally:
        st.stop()


def _schemathesis(stack: FullStack, token: str, examples: int, seconds: float, report: Path,
                  *filters: str) -> tuple[int, str]:
    exe = Path(sys.executable).with_name("schemathesis")
    budget = ["--max-time", str(int(seconds))] if seconds else []
    cmd = [str(exe), "run", f"{stack.base}/openapi.json", "-H", f"Authorization: Bearer {token}",
           "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(examples), *budget,
           "--workers", "1", "--no-color", "--suppress-health-check", "all", "--generation-database", "none",
           "--request-timeout", "30", "--report", "junit", "--report-junit-path", str(report), *filters]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    return done.returncode, done.stdout + done.stderr


@pytest.mark.timeout(int(BUDGET_S) + 1200)  # the passes, schemathesis' start and the shrinking of failures
def test_schema_fuzz_finds_no_server_error_and_no_contract_violation(stack: FullStack, tmp_path: Path) -> None:
    # an operator role over every operation but the administrators' (the session's own logout would end the
    # run); the security administrator over users, roles and keys; the auditor over the log; and the operator
    # once more over the administrators' operations, lightly: it gets the guard's 403 before any input is
    # read, so a few cases per operation check that answer against each operation's contract
    admin_ops = "^/v1/(security|audit)/"
    passes = [
        ("operator", stack.token, EXAMPLES, 0.55, ("--exclude-path", "/v1/auth/logout", "--exclude-path",
                                                   "/v1/auth/password", "--exclude-path-regex", admin_ops)),
        ("secadmin", stack.admin_tokens["secadmin"], EXAMPLES, 0.25, ("--include-path-regex", "^/v1/security/")),
        ("auditor", stack.admin_tokens["auditor"], EXAMPLES, 0.15, ("--include-path-regex", "^/v1/audit/")),
        ("operator-denied", stack.token, 3, 0.05, ("--include-path-regex", admin_ops, "--phases", "fuzzing")),
    ]
    failures = []
    for name, token, examples, share, filters in passes:
        seconds = max(10.0, BUDGET_S * share) if BUDGET_S else 0.0
        rc, out = _schemathesis(stack, token, examples, seconds, tmp_path / f"{name}.xml", *filters)
        if rc != 0:  # schemathesis exits non-zero on any failed check or error
            failures.append(f"--- pass {name} (exit {rc}) ---\n{out[-12000:]}")
    # Milvus Lite's own gRPC server (a side process) logs a traceback when pymilvus probes AllocTimestamp,
    # which Lite does not implement; pymilvus goes on without it and the answer is right: not ours
    crashed = [line for line in stack.served.output if '"level":"ERROR"' in line and "Traceback" in line
               and not ('"logger":"grpc._server"' in line and "AllocTimestamp" in line)]
    assert failures == [], "\n".join(failures)
    assert crashed == [], "server logged tracebacks during the fuzz:\n" + "".join(crashed[-5:])
