#!/usr/bin/env python3
"""Writes JSON Lines input for `tandem ingest` scale runs (docs/performance.md).

    gen-ingest.py --start 0 --count 1000000 --dim 384 > /tmp/ingest-1m.jsonl

Record n gets the id 00000000-0000-4000-8000-<n as 12 hex digits>, so files
with disjoint or overlapping --start ranges write disjoint or overlapping
records. Vectors are random unit vectors from a pool of 4,096 (formatting a
fresh one per line would make this script, not the ingest, the bottleneck);
the content and metadata vary per record; scopes cycle over 8.
"""

import argparse
import json
import math
import random
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    rng = random.Random(a.seed)
    pool = []
    for _ in range(4096):
        v = [rng.gauss(0.0, 1.0) for _ in range(a.dim)]
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        pool.append("[" + ",".join(f"{x / norm:.6f}" for x in v) + "]")
    out = sys.stdout
    for n in range(a.start, a.start + a.count):
        head = json.dumps(
            {
                "id": f"00000000-0000-4000-8000-{n:012x}",
                "scope": f"scope-{n % 8}",
                "content": f"record {n}",
                "metadata": {"n": n, "bucket": n % 100},
            }
        )
        out.write(head[:-1] + ', "vector": ' + pool[n % len(pool)] + "}\n")


if __name__ == "__main__":
    main()
