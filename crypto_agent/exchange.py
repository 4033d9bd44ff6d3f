"""A client of the Binance spot REST API that keeps to Binance's stated limits.

It reads ``X-MBX-USED-WEIGHT-1M`` and slows down before the limit, waits ``Retry-After`` on 429,
stops at once on 418 (IP banned), and retries 5xx, timeouts, connection errors and malformed
bodies a bounded number of times with exponential backoff. It never retries another 4xx.
One client may be shared by several threads: they share one weight budget.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import httpx

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.store import Candle, candle_from_kline

KLINES_MAX_LIMIT = 1000

# Request weights as Binance states them for the endpoints we call.
ENDPOINT_WEIGHTS: dict[str, int] = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/klines": 2,
}

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
INVALID_SYMBOL_CODE = -1121


# --- errors ---


class ExchangeUnreachable(CryptoAgentError):
    """The exchange did not answer (connection refused, DNS, timeouts), even after retries."""


class IPBanned(CryptoAgentError):
    """HTTP 418: the exchange banned this IP until a given time; nothing may be sent before then."""

    def __init__(self, until: datetime, url: str) -> None:
        self.until = until
        stamp = until.strftime("%Y-%m-%d %H:%M:%S UTC")
        super().__init__(
            f"the exchange at {url} banned this IP (HTTP 418) until {stamp}",
            hint=f"do not retry before {stamp}: requests during a ban extend it; then lower "
            "weight_limit_per_minute or the number of workers",
        )


class RateLimited(CryptoAgentError):
    """HTTP 429 with a Retry-After longer than the client will wait (or 429s that do not stop)."""

    def __init__(self, retry_after_s: float, url: str, reason: str) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the exchange at {url} rate-limits this client (HTTP 429): {reason}",
            hint=f"retry in {retry_after_s:.0f} s or later; lower weight_limit_per_minute or the workers",
        )


class InvalidSymbol(CryptoAgentError):
    """The exchange does not know a symbol (Binance code -1121)."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        super().__init__(
            f"the exchange does not know symbol {symbol} (Binance code -1121 'Invalid symbol')",
            hint=f"check the spelling; if {symbol} was delisted, remove it from `symbols` in the config file",
        )


class ExchangeError(CryptoAgentError):
    """The exchange refused a request (4xx) or kept failing (5xx after retries)."""

    def __init__(self, status: int, path: str, code: int | None, msg: str | None, attempts: int = 1) -> None:
        self.status = status
        self.code = code
        self.msg = msg
        detail = f"code {code}: {msg}" if code is not None else (msg or "no error body")
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        hint = (
            "the exchange is failing; retry later, and check its status page"
            if status >= 500
            else "the exchange rejected this request; check the symbol, timeframe and dates it names"
        )
        super().__init__(f"the exchange answered HTTP {status} to {path}{tries} ({detail})", hint=hint)


class MalformedResponse(CryptoAgentError):
    """The exchange kept sending bodies that are not the JSON Binance documents."""

    def __init__(self, path: str, detail: str, attempts: int) -> None:
        super().__init__(
            f"the exchange sent a malformed response to {path} {attempts} time(s): {detail}",
            hint="retry later; check that exchange_url points at a Binance-compatible REST API",
        )


class _BadBody(Exception):
    """A body that does not have the documented shape (retried like a 5xx)."""


# --- the weight budget ---


@dataclass(frozen=True)
class _Ticket:
    """One request's reservation: its weight, the window it was sent in, the weight sent up to it."""

    weight: int
    window: int
    sent_total: int


class WeightBudget:
    """The request weight used in the exchange's current window, shared by the threads of one client."""

    def __init__(
        self,
        limit: int,
        safety_margin: float,
        window_s: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.threshold = limit * safety_margin
        self.window_s = window_s
        # Wait a little past the boundary: the exchange's clock may lag ours.
        self.boundary_guard_s = min(1.0, 0.05 * window_s)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._window = -1
        self._used = 0
        self._in_flight = 0
        self._sent_total = 0
        self._paused_until = 0.0
        self.last_header: int | None = None
        self.waits = 0

    @property
    def used(self) -> int:
        """Our estimate of the weight used in the current window."""
        with self._lock:
            self._roll(self._clock())
            return self._used

    def _roll(self, now: float) -> int:
        window = int(now // self.window_s)
        if window != self._window:
            self._window = window
            # Requests still in flight may be counted in the new window by the exchange.
            self._used = self._in_flight
        return window

    def acquire(self, weight: int) -> _Ticket:
        """Reserve weight for one request, sleeping until the next window when it would pass the margin."""
        while True:
            with self._lock:
                now = self._clock()
                if now < self._paused_until:
                    wait = self._paused_until - now
                else:
                    window = self._roll(now)
                    if self._used + weight <= self.threshold or self._used == 0:
                        self._used += weight
                        self._in_flight += weight
                        self._sent_total += weight
                        return _Ticket(weight, window, self._sent_total)
                    wait = (window + 1) * self.window_s - now + self.boundary_guard_s
                self.waits += 1
            self._sleep(wait)

    def finish(self, ticket: _Ticket, used_header: int | None) -> None:
        """Release a request's reservation and learn from the exchange's used-weight header."""
        with self._lock:
            self._in_flight -= ticket.weight
            if used_header is None:
                return
            self.last_header = used_header
            if ticket.window == self._roll(self._clock()):
                # The header counts this request; what we sent after it may not be counted yet.
                estimate = used_header + (self._sent_total - ticket.sent_total)
                self._used = max(self._used, estimate)

    def pause(self, seconds: float) -> None:
        """Send nothing for this many seconds (a 429's Retry-After), in every thread."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


@dataclass(frozen=True)
class RateLimitStatus:
    """Where a client stands against the exchange's request-weight limit (the runbook's "rate limit status")."""

    used_weight: int | None
    weight_limit: int
    window_s: float
    banned_until: datetime | None

    @property
    def used_share(self) -> float | None:
        """Used weight as a share of the limit, None before any answer."""
        return None if self.used_weight is None else self.used_weight / self.weight_limit


# --- the client ---


def _retry_after_s(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _used_weight(resp: httpx.Response) -> int | None:
    value = resp.headers.get(USED_WEIGHT_HEADER) or resp.headers.get("X-MBX-USED-WEIGHT")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _binance_error(resp: httpx.Response) -> tuple[int | None, str | None]:
    try:
        body = resp.json()
    except ValueError:
        return None, resp.text[:200] or None
    if isinstance(body, dict):
        code = body.get("code")
        return (code if isinstance(code, int) else None), body.get("msg")
    return None, str(body)[:200]


def _is_kline(k: Any) -> bool:
    return isinstance(k, list) and len(k) >= 9 and isinstance(k[0], int) and isinstance(k[6], int)


class BinanceClient:
    """An httpx client of the Binance spot REST API (or the simulator), within Binance's limits."""

    def __init__(
        self,
        base_url: str,
        *,
        weight_limit: int = 6000,
        safety_margin: float = 0.9,
        weight_window_s: float = 60.0,
        timeout_s: float = 10,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_retry_after_s: float = 120,
        max_rate_limit_waits: int = 10,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if weight_limit <= 0 or not 0 < safety_margin <= 1 or weight_window_s <= 0:
            raise InputError(
                f"bad rate-limit settings: weight_limit={weight_limit}, safety_margin={safety_margin}, "
                f"weight_window_s={weight_window_s}",
                hint="weight_limit and weight_window_s must be positive, safety_margin in (0, 1]",
            )
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"{base_url!r} is not an http(s) URL", hint="pass e.g. https://api.binance.com")
        self.base_url = base_url.rstrip("/")
        self.weight_limit = weight_limit
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.max_rate_limit_waits = max_rate_limit_waits
        self._sleep = sleep
        self.budget = WeightBudget(weight_limit, safety_margin, weight_window_s, sleep=sleep)
        self.banned_until: datetime | None = None
        self._ban_lock = threading.Lock()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
            headers={"User-Agent": "crypto-agent"},
        )

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> BinanceClient:
        """A client configured by the runbook's settings (exchange_url, limits, timeouts, retries)."""
        base_url = overrides.pop("base_url", None) or settings.exchange_url
        kwargs: dict[str, Any] = {
            "weight_limit": settings.weight_limit_per_minute,
            "safety_margin": settings.weight_safety_margin,
            "weight_window_s": settings.weight_window_s,
            "timeout_s": settings.request_timeout_s,
            "retries": settings.request_retries,
            "backoff_s": settings.retry_backoff_s,
            "max_retry_after_s": settings.max_retry_after_s,
        }
        kwargs.update(overrides)
        return cls(base_url, **kwargs)

    @property
    def used_weight(self) -> int | None:
        """The used weight the exchange last reported (X-MBX-USED-WEIGHT-1M), None before any answer."""
        return self.budget.last_header

    def rate_limit_status(self, refresh: bool = True) -> RateLimitStatus:
        """The used weight against the limit; with refresh, a ping (weight 1) reads the exchange's count now."""
        if refresh:
            self.ping()
        return RateLimitStatus(self.used_weight, self.weight_limit, self.budget.window_s, self.banned_until)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the request loop ---

    def _raise_if_banned(self) -> None:
        with self._ban_lock:
            if self.banned_until is not None and datetime.now(UTC) < self.banned_until:
                raise IPBanned(self.banned_until, self.base_url)

    def _banned(self, retry_after: float | None) -> IPBanned:
        # Binance sends Retry-After with a 418; without one, assume its shortest ban (2 minutes).
        seconds = retry_after if retry_after is not None else 120.0
        until = datetime.fromtimestamp(time.time() + seconds, UTC).replace(microsecond=0)
        with self._ban_lock:
            if self.banned_until is None or until > self.banned_until:
                self.banned_until = until
            return IPBanned(self.banned_until, self.base_url)

    def _get(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        parse: Callable[[Any], Any] = lambda body: body,
        symbol: str | None = None,
    ) -> Any:
        """GET a path within the weight budget; retry what is worth retrying; parse the JSON body."""
        weight = ENDPOINT_WEIGHTS.get(path, 1)
        attempt = 0
        rate_limit_waits = 0
        while True:
            self._raise_if_banned()
            ticket = self.budget.acquire(weight)
            self._raise_if_banned()  # another thread may have been banned while we waited
            failure: tuple[str, str]
            try:
                resp = self._http.get(path, params=params)
            except httpx.TimeoutException as exc:
                self.budget.finish(ticket, None)
                failure = ("unreachable", f"timed out ({type(exc).__name__})")
            except httpx.ConnectError as exc:
                self.budget.finish(ticket, None)
                failure = ("unreachable", f"cannot connect ({exc})")
            except httpx.TransportError as exc:  # the connection broke mid-answer
                self.budget.finish(ticket, None)
                failure = ("malformed", f"broken answer ({type(exc).__name__}: {exc})")
            else:
                self.budget.finish(ticket, _used_weight(resp))
                status = resp.status_code
                if status == 418:
                    raise self._banned(_retry_after_s(resp))
                if status == 429:
                    wait = _retry_after_s(resp)
                    if wait is None:  # Binance always sends it; be safe: the rest of the window
                        wait = self.budget.window_s - time.time() % self.budget.window_s
                    rate_limit_waits += 1
                    if wait > self.max_retry_after_s:
                        raise RateLimited(wait, self.base_url, f"Retry-After {wait:.0f} s exceeds "
                                          f"max_retry_after_s={self.max_retry_after_s:.0f}")
                    if rate_limit_waits > self.max_rate_limit_waits:
                        raise RateLimited(wait, self.base_url, f"still 429 after {self.max_rate_limit_waits} waits")
                    self.budget.pause(wait)
                    continue
                if 400 <= status < 500:
                    code, msg = _binance_error(resp)
                    if code == INVALID_SYMBOL_CODE and symbol is not None:
                        raise InvalidSymbol(symbol)
                    raise ExchangeError(status, path, code, msg)
                if status >= 500:
                    code, msg = _binance_error(resp)
                    failure = ("5xx", json.dumps([status, code, msg]))
                else:
                    try:
                        return parse(resp.json())
                    except (ValueError, _BadBody) as exc:
                        failure = ("malformed", str(exc)[:200] or type(exc).__name__)
            if attempt >= self.retries:
                raise self._gave_up(path, failure, attempt + 1)
            self._sleep(self.backoff_s * 2**attempt)
            attempt += 1

    def _gave_up(self, path: str, failure: tuple[str, str], attempts: int) -> CryptoAgentError:
        kind, detail = failure
        if kind == "unreachable":
            return ExchangeUnreachable(
                f"cannot reach the exchange at {self.base_url} ({path}): {detail}, after {attempts} attempt(s)",
                hint=f"check the network and that the exchange is up (GET {self.base_url}/api/v3/ping); "
                "check exchange_url (CRYPTO_AGENT_EXCHANGE_URL or --exchange-url)",
            )
        if kind == "5xx":
            status, code, msg = json.loads(detail)
            return ExchangeError(status, path, code, msg, attempts)
        return MalformedResponse(path, detail, attempts)

    # --- endpoints ---

    def ping(self) -> None:
        """GET /api/v3/ping: returns when the exchange answers; ExchangeUnreachable when it does not."""
        self._get("/api/v3/ping")

    def server_time(self) -> int:
        """The exchange's clock, epoch milliseconds (GET /api/v3/time)."""

        def parse(body: Any) -> int:
            if not isinstance(body, dict) or not isinstance(body.get("serverTime"), int):
                raise _BadBody(f"expected {{'serverTime': ms}}, got {str(body)[:100]}")
            return body["serverTime"]

        return self._get("/api/v3/time", parse=parse)

    def exchange_info(self, symbols: list[str] | None = None) -> dict:
        """GET /api/v3/exchangeInfo, for every symbol or only the given ones."""
        params: dict[str, Any] = {}
        if symbols:
            params["symbols"] = json.dumps(list(symbols), separators=(",", ":"))

        def parse(body: Any) -> dict:
            if not isinstance(body, dict) or not isinstance(body.get("symbols"), list):
                raise _BadBody(f"expected an object with 'symbols', got {str(body)[:100]}")
            return body

        symbol = symbols[0] if symbols and len(symbols) == 1 else None
        return self._get("/api/v3/exchangeInfo", params, parse=parse, symbol=symbol)

    def trading_symbols(self) -> set[str]:
        """The symbols the exchange trades now (status TRADING)."""
        info = self.exchange_info()
        return {s["symbol"] for s in info["symbols"] if s.get("status") == "TRADING"}

    def klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = KLINES_MAX_LIMIT,
    ) -> list[list]:
        """Raw klines (GET /api/v3/klines): open times in [start_ms, end_ms] (inclusive, as Binance), oldest first."""
        if not 1 <= limit <= KLINES_MAX_LIMIT:
            raise InputError(f"klines limit {limit} out of range", hint=f"use 1..{KLINES_MAX_LIMIT}")
        params: dict[str, Any] = {"symbol": symbol, "interval": interval, "limit": limit}
        if start_ms is not None:
            params["startTime"] = int(start_ms)
        if end_ms is not None:
            params["endTime"] = int(end_ms)

        def parse(body: Any) -> list[list]:
            if not isinstance(body, list):
                raise _BadBody(f"expected a list of klines, got {str(body)[:100]}")
            for k in body:
                if not _is_kline(k):
                    raise _BadBody(f"not a kline: {str(k)[:100]}")
            return body

        return self._get("/api/v3/klines", params, parse=parse, symbol=symbol)

    def iter_closed_klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int | None = None,
        *,
        now_ms: int | None = None,
    ) -> Iterator[list[Candle]]:
        """Closed candles with open time in [start_ms, end_ms), one list per page of 1000, oldest first.

        A candle is closed when its close time is before ``now_ms`` (the exchange's clock when None).
        """
        if now_ms is None:
            now_ms = self.server_time()
        cursor = int(start_ms)
        while end_ms is None or cursor < end_ms:
            raw = self.klines(symbol, interval, cursor, None if end_ms is None else end_ms - 1)
            page: list[Candle] = []
            for k in raw:
                if k[0] < cursor:
                    raise MalformedResponse("/api/v3/klines", f"kline {k[0]} before startTime {cursor}", 1)
                if k[6] >= now_ms or (end_ms is not None and k[0] >= end_ms):
                    continue
                page.append(candle_from_kline(k))
            if page:
                yield page
            if len(raw) < KLINES_MAX_LIMIT or raw[-1][6] >= now_ms:
                return
            cursor = raw[-1][0] + 1

    def closed_klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int,
        end_ms: int | None = None,
        *,
        now_ms: int | None = None,
    ) -> list[Candle]:
        """Closed candles with open time in [start_ms, end_ms) as stored candles, every page joined."""
        out: list[Candle] = []
        for page in self.iter_closed_klines(symbol, interval, start_ms, end_ms, now_ms=now_ms):
            out.extend(page)
        return out
