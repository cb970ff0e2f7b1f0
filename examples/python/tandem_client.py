#!/usr/bin/env python3
"""A small client of `tandem serve`'s HTTP API, using only the standard library.

    python3 examples/python/tandem_client.py http://127.0.0.1:8080

With TANDEM_API_TOKEN set, it sends the token. The demo at the bottom writes
three records (letting the service embed their text), repeats the write with
the same idempotency key (nothing is written twice), searches, shows a typed
error and deletes what it wrote.

What a client must know (docs/serve.md, docs/errors.md): every error body has a
stable `code`, `retryable` and `outcome`. `outcome: not_applied` means nothing
of the call happened; `unknown` means it may have. A write is safe to retry
with the same `Idempotency-Key` either way — which `call` below does for
retryable errors and for lost connections.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid


class TandemError(Exception):
    """An error answered by the service (or a lost connection)."""

    def __init__(self, status, body):
        self.status = status
        self.code = body.get("code", "unknown")
        self.retryable = bool(body.get("retryable", False))
        self.outcome = body.get("outcome", "unknown")
        self.field = body.get("field")
        super().__init__(f"{self.code}: {body.get('message', '')}")


class Tandem:
    def __init__(self, url, token=None, timeout=60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method, path, body=None, key=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Idempotency-Key", key)
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"code": "http_%d" % e.code, "message": raw.decode(errors="replace")}
            raise TandemError(e.code, body) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            # No answer: the call may or may not have happened.
            raise TandemError(0, {"code": "no_answer", "message": str(e),
                                  "retryable": True, "outcome": "unknown"}) from None

    def call(self, method, path, body=None, key=None, attempts=5):
        """One call; a write retried under its idempotency key while retryable."""
        for attempt in range(attempts):
            try:
                return self._request(method, path, body, key)
            except TandemError as e:
                # Reads are always safe to repeat; writes only under their key.
                safe = method == "GET" or key is not None or path not in WRITES
                if not (e.retryable and safe) or attempt == attempts - 1:
                    raise
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
        raise AssertionError("unreachable")

    def upsert(self, records, key=None, embed=None):
        body = {"records": records}
        if embed:
            body["embed"] = embed
        return self.call("POST", "/api/v1/records", body, key or str(uuid.uuid4()))

    def delete(self, key=None, **selector):
        return self.call("POST", "/api/v1/records/delete", selector, key or str(uuid.uuid4()))

    def search(self, **query):
        return self.call("POST", "/api/v1/search", query)["hits"]

    def get(self, ids):
        return self.call("POST", "/api/v1/records/get", {"ids": ids})

    def status(self):
        return self.call("GET", "/api/v1/status")


WRITES = ("/api/v1/records", "/api/v1/records/delete")


def demo(url):
    t = Tandem(url, os.environ.get("TANDEM_API_TOKEN"))
    scope = "python-example-" + uuid.uuid4().hex[:8]
    records = [
        {"scope": scope, "content": "red running shoes", "metadata": {"item": "sku-17"}},
        {"scope": scope, "content": "blue trail running shoes", "metadata": {"item": "sku-18"}},
        {"scope": scope, "content": "wool winter hat", "metadata": {"item": "sku-40"}},
    ]
    key = "python-example/" + scope
    first = t.upsert(records, key=key, embed="hash")
    print(f"inserted {first['inserted']} records")
    again = t.upsert(records, key=key, embed="hash")
    print(f"the same call again: replayed: {again['replayed']}, same ids: {again['ids'] == first['ids']}")

    hits = t.search(text="red running shoes", k=2, scope=scope)
    print(f"best hit: {hits[0]['record']['content']} (score {hits[0]['score']:.3f})")

    try:
        t.upsert([{"scope": scope, "vector": [1.0, 2.0]}])  # not the collection's dimension
    except TandemError as e:
        print(f"error {e.code} (retryable: {e.retryable}, outcome: {e.outcome}) at {e.field}")

    gone = t.delete(scope=scope)
    print(f"deleted {gone['deleted']} records")
    s = t.status()
    print(f"the service has committed {s['activity']['series'][0]['total']} writes since it started")


if __name__ == "__main__":
    demo(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080")
