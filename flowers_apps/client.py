"""A client of `flowers-serve` (stdlib only: no Ray, no third-party HTTP library), and the retry rule every
client should follow: send a request again, once, when it failed with a connection error or a 5xx answer (the
replica or node that held it died; Serve is replacing it), never on a 4xx (the same request fails again).

    client = ServeClient("http://127.0.0.1:8000")
    client.predict(Path("rose.jpg").read_bytes())   # -> {"label": "rose", "probabilities": {...}, "model": ...}

One keep-alive connection per client: use one client per thread.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

from flowers_classifier.errors import FlowersError

RETRIES = 1  # the documented rule: one retry on a connection error or a 5xx answer


class ServeRequestError(FlowersError, ValueError):
    """The server refused the request (4xx, or 5xx after the retry); the message holds its status and reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class ServeClient:
    """POST /predict and GET /healthz on one keep-alive connection to `url` (http://HOST:PORT)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = RETRIES):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: expected http://HOST:PORT (the address flowers-serve prints)")
        self.host, self.port, self.timeout, self.retries = parts.hostname, parts.port or 80, timeout, retries
        self.conn: http.client.HTTPConnection | None = None
        self.retried = 0  # requests sent again under the rule (fault tests and benchmarks count them)
        self.last_headers: dict[str, str] = {}

    def predict(self, image: bytes, *, calibrated: bool = True, top_k: int | None = None) -> dict:
        query = {"calibrated": str(calibrated).lower()} | ({"top_k": top_k} if top_k else {})
        return self.request("POST", "/predict?" + urllib.parse.urlencode(query), image)

    def healthz(self) -> dict:
        return self.request("GET", "/healthz")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        """The JSON answer; ServeRequestError on a 4xx, or on a 5xx / connection error that the retry did not cure."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                status, data = self._send(method, path, body, headers or {})
            except (OSError, http.client.HTTPException):
                self.close()  # a fresh connection for the retry: this one may point at a dead proxy
                if last:
                    raise
                self.retried += 1
                continue
            if 200 <= status < 300:
                return json.loads(data)
            if status < 500 or last:
                raise ServeRequestError(status, _reason(data))
            self.retried += 1
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        self.last_headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            self.close()
        return response.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _reason(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data.decode(errors="replace")[:500]
