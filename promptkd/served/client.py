"""HTTP to a teacher server: JSON requests with retries, and many of them in flight at once.

A request that times out, cannot connect, or gets a 5xx (or 429) answer is retried ``retries`` times, waiting
``backoff * 2**attempt`` seconds (at most ``max_wait``) between tries; then :class:`ServerError` names the URL,
what the request was for (``what``: "example 17") and the last failure. A 4xx answer is the request's fault and
is not retried: its message is the server's. Requests go through ``requests`` (one session per thread, so
connections are kept alive); :meth:`Client.map` runs ``concurrency`` of them at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from urllib.parse import urlparse

from ..errors import InputError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerError(InputError):
    """The teacher server could not be reached, or refused a request (after the retries, for a transient fault)."""


class RequestRefused(ServerError):
    """A 4xx answer: the server understood the request and refused it (``status``, ``message``: the server's)."""

    def __init__(self, text: str, status: int, message: str):
        super().__init__(text)
        self.status, self.message = status, message


def check_url(url) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash, or InputError naming ``--server``."""
    if not isinstance(url, str) or not url:
        raise InputError(f"--server must be a URL such as http://localhost:8000, got {url!r}")
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--server must be an http:// or https:// URL such as http://localhost:8000, got {url!r}")
    return url.rstrip("/")


class Client:
    """JSON over HTTP to the server at ``url`` (:func:`check_url`); ``timeout`` seconds per request."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 4, backoff: float = 0.5,
                 max_wait: float = 20.0, concurrency: int = 8):
        import requests  # noqa: F401  (fail here, not in a worker thread, if it is missing)

        self.url = check_url(url)
        for name, value, positive in (("timeout", timeout, True), ("backoff", backoff, False),
                                      ("max_wait", max_wait, False)):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
                    or (value <= 0 if positive else value < 0)):
                raise InputError(f"--{name.replace('_', '-')} must be a number {'>' if positive else '>='} 0, "
                                 f"got {value!r}")
        for name, value, low in (("retries", retries, 0), ("concurrency", concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"--{name} must be an integer >= {low}, got {value!r}")
        self.timeout, self.retries, self.backoff, self.max_wait = float(timeout), retries, backoff, max_wait
        self.concurrency = concurrency
        self._local = threading.local()
        self.requests = 0  # sent, retries included

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session

    def request(self, method: str, path: str, payload: dict | None = None, what: str = "a request",
                retry: bool = True):
        """The JSON answer to ``method path`` (with ``payload`` as its JSON body)."""
        import requests

        url = f"{self.url}{path}"
        attempts = 1 + (self.retries if retry else 0)
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.max_wait, self.backoff * 2 ** (attempt - 1)))
            self.requests += 1
            try:
                answer = self._session().request(method, url, json=payload, timeout=self.timeout)
            except requests.Timeout:
                last = f"no answer within {self.timeout:g} s (--timeout)"
                continue
            except requests.ConnectionError as e:
                last = f"cannot connect ({type(e).__name__}: {str(e)[:200]})"
                continue
            if answer.status_code in RETRY_STATUS:
                last = f"HTTP {answer.status_code}: {answer.text[:300]}"
                continue
            if answer.status_code >= 400:
                message = _error_message(answer)
                raise RequestRefused(f"{url} refused {what} (HTTP {answer.status_code}): {message}",
                                     answer.status_code, message)
            try:
                return answer.json()
            except ValueError:
                last = f"an answer that is not JSON: {answer.text[:200]!r}"
                continue
        tries = f"{attempts} tries" if attempts > 1 else "one try"
        raise ServerError(f"the teacher server at {self.url} failed {what} after {tries}: {last}; check that the "
                          "server is up (the cache keeps every finished shard: rerun with --resume)")

    def get(self, path: str, what: str = "a request", retry: bool = True):
        return self.request("GET", path, None, what, retry)

    def post(self, path: str, payload: dict, what: str = "a request", retry: bool = True):
        return self.request("POST", path, payload, what, retry)

    def map(self, fn: Callable, items: Iterable) -> list:
        """``[fn(item) for item in items]`` with ``concurrency`` calls in flight; the first failure is raised once
        the calls already running end (the rest are not started)."""
        items = list(items)
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = [pool.submit(fn, item) for item in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                raise failed[0].exception()
            return [f.result() for f in futures]


def _error_message(answer) -> str:
    """The server's own words: OpenAI-style ``{"error": {"message"}}``, FastAPI's ``{"detail"}``, or the text."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:500]
    return str(body)[:500]
