"""The simulator's HTTP server: Binance spot REST, Fear & Greed, FRED, faults and weight limits."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import math
import re
import socket
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.simulator.macro import (
    FNG_FIRST_DAY,
    FRED_ERRORS,
    FearGreed,
    Fred,
    date_of_day,
    fng_classification,
)
from crypto_agent.simulator.market import (
    DAY_MS,
    EPOCH_DAY,
    INTERVALS_MS,
    N_COLUMNS,
    Market,
    interval_offset,
    symbol_profile,
)
from crypto_agent.universe import SYMBOL_RE, UNIVERSE

log = logging.getLogger("crypto_agent.simulator")

# Request weights as Binance states them for these endpoints.
WEIGHTS: dict[str, int] = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/klines": 2,
}
# Over-limit requests tolerated in one window before the client is banned.
REJECTIONS_BEFORE_BAN = 3
KLINES_DEFAULT_LIMIT = 500
KLINES_MAX_LIMIT = 1000

_BINANCE_SYMBOL_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
_DIGITS_RE = re.compile(r"^[0-9]{1,20}$")
_JSON = "application/json;charset=UTF-8"
_NOT_FOUND_HTML = b"<html><body><h2>404 Not found</h2></body></html>"


@dataclass
class Response:
    """An HTTP response to send."""

    status: int
    body: bytes = b""
    content_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, _JSON, dict(headers or {}))


def _binance_error(status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"code": code, "msg": msg}, headers)


class BinanceRequestError(Exception):
    """A request Binance answers with 400 and an error code."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _mandatory(name: str) -> BinanceRequestError:
    return BinanceRequestError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def _illegal(name: str, legal: str) -> BinanceRequestError:
    return BinanceRequestError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '{legal}'.")


# --- faults ---------------------------------------------------------------------------------------

FAULT_KEYS = ("down", "slow_s", "storm_429", "retry_after_s", "ban_418_s", "malformed", "gaps")


@dataclass(frozen=True)
class Gap:
    """Klines with open time in [start_ms, end_ms) missing for a symbol and interval (None = all)."""

    symbol: str | None
    interval: str | None
    start_ms: int
    end_ms: int

    def covers(self, symbol: str, interval: str) -> bool:
        """Whether this gap applies to klines of this symbol and interval."""
        return self.symbol in (None, symbol) and self.interval in (None, interval)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, as set_faults takes it."""
        return {"symbol": self.symbol, "interval": self.interval, "start_ms": self.start_ms, "end_ms": self.end_ms}


def _number(name: str, value: Any, kind: type, minimum: float = 0) -> Any:
    not_a_number = isinstance(value, bool) or not isinstance(value, (int, float))
    if not_a_number or (kind is int and not float(value).is_integer()):
        raise InputError(f"fault {name!r} must be a {'whole ' if kind is int else ''}number, got {value!r}")
    if value < minimum:
        raise InputError(f"fault {name!r} must be >= {minimum}, got {value!r}")
    return kind(value)


def _parse_gap(item: Any) -> Gap:
    if not isinstance(item, dict) or not {"start_ms", "end_ms"} <= item.keys():
        raise InputError(
            f"a gap must be an object with start_ms and end_ms, got {item!r}",
            hint='e.g. {"symbol": "BTCUSDT", "interval": "1h", "start_ms": 1700000000000, "end_ms": 1700036000000}',
        )
    unknown = set(item) - {"symbol", "interval", "start_ms", "end_ms"}
    if unknown:
        raise InputError(f"unknown gap field(s) {sorted(unknown)}", hint="use symbol, interval, start_ms, end_ms")
    symbol, interval = item.get("symbol"), item.get("interval")
    if symbol is not None and (not isinstance(symbol, str) or not SYMBOL_RE.match(symbol)):
        raise InputError(f"gap symbol {symbol!r} is not a symbol such as BTCUSDT", hint="or null for every symbol")
    if interval is not None and interval not in INTERVALS_MS:
        raise InputError(f"gap interval {interval!r} is unknown", hint=f"use one of {', '.join(INTERVALS_MS)} or null")
    start = _number("gaps.start_ms", item["start_ms"], int)
    end = _number("gaps.end_ms", item["end_ms"], int)
    if end <= start:
        raise InputError(f"gap end_ms {end} is not after start_ms {start}")
    return Gap(symbol, interval, start, end)


class Faults:
    """The faults in force; counters (storm_429, malformed) count down as requests use them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.down: str | None = None
        self.slow_s = 0.0
        self.storm_429 = 0
        self.retry_after_s = 1
        self.ban_until = 0.0
        self.malformed = 0
        self.gaps: tuple[Gap, ...] = ()

    def clear(self) -> None:
        """No fault at all."""
        with self._lock:
            self._reset()

    def update(self, changes: dict[str, Any]) -> None:
        """Merge fault settings, all validated before any is applied; InputError names a bad one."""
        unknown = set(changes) - set(FAULT_KEYS)
        if unknown:
            raise InputError(f"unknown fault(s) {sorted(unknown)}", hint=f"faults are: {', '.join(FAULT_KEYS)}")
        parsed: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "down":
                if value not in (None, "503"):
                    raise InputError(
                        f"fault 'down' must be null or \"503\", got {value!r}",
                        hint='for connection refused, use go_down("refuse") or POST /_sim/down {"mode": "refuse"}',
                    )
                parsed[key] = value
            elif key in ("slow_s", "ban_418_s"):
                parsed[key] = _number(key, value, float)
            elif key == "gaps":
                if value is None:
                    value = []
                if not isinstance(value, list):
                    raise InputError(f"fault 'gaps' must be a list, got {value!r}")
                parsed[key] = tuple(_parse_gap(item) for item in value)
            else:
                parsed[key] = _number(key, value, int)
        with self._lock:
            for key, value in parsed.items():
                if key == "ban_418_s":
                    self.ban_until = self._clock() + value if value > 0 else 0.0
                else:
                    setattr(self, key, value)

    def snapshot(self) -> dict[str, Any]:
        """The faults in force, in the shape set_faults takes (ban_418_s: seconds left)."""
        with self._lock:
            return {
                "down": self.down,
                "slow_s": self.slow_s,
                "storm_429": self.storm_429,
                "retry_after_s": self.retry_after_s,
                "ban_418_s": max(0.0, round(self.ban_until - self._clock(), 3)),
                "malformed": self.malformed,
                "gaps": [g.as_dict() for g in self.gaps],
            }

    def take_storm(self) -> int | None:
        """Retry-After of a storm 429 if one is due (using it up), else None."""
        with self._lock:
            if self.storm_429 <= 0:
                return None
            self.storm_429 -= 1
            return self.retry_after_s

    def take_malformed(self) -> bool:
        """Whether this klines response must be malformed (using one up)."""
        with self._lock:
            if self.malformed <= 0:
                return False
            self.malformed -= 1
            return True


# --- weight limits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """The limiter's answer: admitted (status 200), or 429/418 with Retry-After seconds."""

    status: int
    retry_after: int
    used: int
    banned_until: float = 0.0


class WeightLimiter:
    """Binance's IP request-weight limit: fixed windows; 429 over the limit, 418 for clients that keep on."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window = -1
        self._used = 0
        self._rejected = 0
        self.banned_until = 0.0

    def _roll(self, now: float) -> None:
        window = math.floor(now / self.window_s)
        if window != self._window:
            self._window, self._used, self._rejected = window, 0, 0

    def admit(self, weight: int) -> Admission:
        """Charge a request's weight, or refuse it (429 over the limit, 418 when banned)."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            if now < self.banned_until:
                return Admission(418, math.ceil(self.banned_until - now), self._used, self.banned_until)
            if self._used + weight > self.limit:
                if self._rejected >= REJECTIONS_BEFORE_BAN:
                    # Ignoring 429s gets the IP banned, for 2 minutes per minute of window.
                    self.banned_until = now + 2 * self.window_s
                    return Admission(418, math.ceil(2 * self.window_s), self._used, self.banned_until)
                self._rejected += 1
                to_next_window = (self._window + 1) * self.window_s - now
                return Admission(429, max(1, math.ceil(to_next_window)), self._used)
            self._used += weight
            return Admission(200, 0, self._used)

    def used(self) -> int:
        """Weight used in the current window."""
        with self._lock:
            self._roll(self._clock())
            return self._used

    def lift_ban(self) -> None:
        """End a ban early."""
        with self._lock:
            self.banned_until = 0.0


# --- the HTTP layer -------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    """A threading server that can drop every open connection, so going down refuses at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close every open client connection (kept-alive ones included)."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (and connections dropped by go_down) are normal here.
        log.debug("connection from %s ended: %r", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the simulator."""

    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections
    server_version = "crypto-agent-simulator"
    sys_version = ""
    timeout = 60  # an idle kept-alive connection is closed after this
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)  # noqa: G003 (the stdlib hands a %-format of its own)

    def _serve(self, method: str) -> None:
        body = b""
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > 0:
            body = self.rfile.read(min(int(length), 1_000_000))
        try:
            response = self.server.simulator.handle(method, self.path, body, self.client_address[0])
        except Exception:  # a bug here must not look like a network fault to the client
            log.exception("simulator failed on %s %s", method, self.path)
            response = _binance_error(500, -1000, "An unknown error occurred while processing the request.")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def do_GET(self) -> None:
        """Serve a GET."""
        self._serve("GET")

    def do_POST(self) -> None:
        """Serve a POST."""
        self._serve("POST")

    def do_DELETE(self) -> None:
        """Serve a DELETE."""
        self._serve("DELETE")

    def do_PUT(self) -> None:
        """Serve a PUT."""
        self._serve("PUT")


# --- the simulator --------------------------------------------------------------------------------


class Simulator:
    """A Binance-compatible exchange (plus Fear & Greed and FRED) on a local port, with faults on demand."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        symbols: Iterable[str] = UNIVERSE,
        weight_limit: int = 6000,
        weight_window_s: float = 60.0,
        seed: int = 0,
        history_days: int = 800,
        *,
        fred_api_key: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.symbols: tuple[str, ...] = tuple(dict.fromkeys(symbols))
        for symbol in self.symbols:
            if not isinstance(symbol, str) or not SYMBOL_RE.match(symbol):
                raise InputError(f"malformed symbol {symbol!r}", hint="symbols are Binance spot pairs such as BTCUSDT")
        if not self.symbols:
            raise InputError("the simulator needs at least one symbol", hint="pass symbols=UNIVERSE or a list")
        if not 0 <= port <= 65535:
            raise InputError(f"port {port} is out of range", hint="use 1-65535, or 0 for any free port")
        if weight_limit <= 0:
            raise InputError(f"weight limit {weight_limit} must be positive", hint="Binance's is 6000 per minute")
        if weight_window_s <= 0:
            raise InputError(f"weight window {weight_window_s} s must be positive", hint="Binance's is 60 s")
        if history_days < 1:
            raise InputError(f"history of {history_days} days must be at least 1 day", hint="e.g. --history-days 30")
        self.host = host
        self.seed = seed
        self.history_days = history_days
        self.weight_limit = weight_limit
        self.weight_window_s = weight_window_s
        self.fred_api_key = fred_api_key
        self._clock = clock
        today = int(clock() * 1000) // DAY_MS
        if today - history_days < EPOCH_DAY:
            raise InputError(
                f"a history of {history_days} days reaches before 2010-01-01, where the simulated market starts",
                hint=f"use at most {today - EPOCH_DAY} days",
            )
        self.market = Market(seed, (today - history_days) * DAY_MS)
        self.fear_greed = FearGreed(self.market)
        self.fred = Fred(seed, lambda: date_of_day(int(self._clock() * 1000) // DAY_MS))
        self.limiter = WeightLimiter(weight_limit, weight_window_s, clock)
        self.faults_state = Faults(clock)
        self._symbol_set = frozenset(self.symbols)
        self._port = port
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.RLock()
        self._up_timer: threading.Timer | None = None
        self._stopped = False
        self._stats_lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._statuses: dict[int, int] = {}

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port served (the one chosen by the OS when constructed with port=0, once started)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:8765."""
        return f"http://{self.host}:{self._port}"

    def _listen(self) -> None:
        try:
            server = _HttpServer((self.host, self._port), self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CryptoAgentError(
                    f"port {self._port} on {self.host} is already in use",
                    hint="stop whatever listens there (is a simulator already running?) or pick another --port",
                ) from None
            raise CryptoAgentError(
                f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}",
                hint="check --host (an address of this machine) and --port",
            ) from None
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"simulator:{self._port}", daemon=True
        )
        self._thread.start()

    def _close(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    def start(self) -> Self:
        """Listen and serve in a background thread; CryptoAgentError when the port is taken."""
        with self._lifecycle:
            self._stopped = False
            if self._server is None:
                self._listen()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection."""
        with self._lifecycle:
            self._stopped = True
            if self._up_timer is not None:
                self._up_timer.cancel()
                self._up_timer = None
            self._close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_down(self, mode: str = "refuse", for_s: float | None = None) -> None:
        """Fail like a dead exchange: "refuse" closes the port (connection refused), "503" answers 503.

        With for_s, come back up by itself after that many seconds.
        """
        if mode not in ("refuse", "503"):
            raise InputError(f"unknown down mode {mode!r}", hint='use "refuse" or "503"')
        with self._lifecycle:
            if mode == "503":
                self.faults_state.update({"down": "503"})
            else:
                self._close()
            if self._up_timer is not None:
                self._up_timer.cancel()
                self._up_timer = None
            if for_s is not None:
                self._up_timer = threading.Timer(for_s, self._come_up_unless_stopped)
                self._up_timer.daemon = True
                self._up_timer.start()

    def come_up(self) -> None:
        """Serve again on the same port, without the 503 fault."""
        with self._lifecycle:
            self.faults_state.update({"down": None})
            if self._server is None:
                self._listen()

    def _come_up_unless_stopped(self) -> None:
        with self._lifecycle:
            if not self._stopped:
                self.come_up()

    def _go_down_unless_stopped(self, mode: str, for_s: float | None) -> None:
        with self._lifecycle:
            if not self._stopped:
                self.go_down(mode, for_s)

    # --- faults and stats -------------------------------------------------------------------------

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge fault settings (see the module docstring); returns the faults now in force."""
        self.faults_state.update(faults)
        return self.faults_state.snapshot()

    def clear_faults(self) -> None:
        """Remove every fault, and lift a weight ban."""
        self.faults_state.clear()
        self.limiter.lift_ban()

    def faults(self) -> dict[str, Any]:
        """The faults in force, in the shape set_faults takes."""
        return self.faults_state.snapshot()

    def stats(self) -> dict[str, Any]:
        """Requests served per path and per status code, and the weight used in the current window."""
        with self._stats_lock:
            return {
                "requests": dict(self._requests),
                "status": dict(self._statuses),
                "used_weight": self.limiter.used(),
            }

    def _count(self, path: str, status: int) -> None:
        with self._stats_lock:
            self._requests[path] = self._requests.get(path, 0) + 1
            self._statuses[status] = self._statuses.get(status, 0) + 1

    # --- request handling -------------------------------------------------------------------------

    def handle(self, method: str, target: str, body: bytes, client_ip: str) -> Response:
        """The response to one HTTP request."""
        parts = urlsplit(target)
        path = parts.path
        if path.startswith("/_sim/"):
            return self._control(method, path, body)
        response = self._public(method, path, parts.query, client_ip)
        self._count(path, response.status)
        return response

    def _public(self, method: str, path: str, query: str, client_ip: str) -> Response:
        faults = self.faults_state
        if faults.slow_s > 0:
            time.sleep(faults.slow_s)
        is_api = path.startswith("/api/")
        weight = WEIGHTS.get(path) if method == "GET" else None
        if faults.down == "503":
            if is_api:
                return _binance_error(503, -1001, "Internal error; unable to process your request. Please try again.",
                                      self._weight_headers())
            return Response(503, b"Service Unavailable", "text/plain")
        if is_api:
            if weight is None:
                return Response(404, _NOT_FOUND_HTML, "text/html", self._weight_headers())
            return self._api(path, query, weight, client_ip)
        if method == "GET" and path in ("/fng", "/fng/"):
            return self._fng(query)
        if method == "GET" and path == "/fred/series/observations":
            return self._fred(query)
        if path.startswith("/fred/"):
            return _json(404, {"error_code": 404, "error_message": "Not Found"})
        return Response(404, _NOT_FOUND_HTML, "text/html")

    def _weight_headers(self, used: int | None = None) -> dict[str, str]:
        used = self.limiter.used() if used is None else used
        return {"X-MBX-USED-WEIGHT": str(used), "X-MBX-USED-WEIGHT-1M": str(used)}

    def _limit_text(self) -> str:
        if self.weight_window_s == 60:
            return f"{self.weight_limit} request weight per minute"
        return f"{self.weight_limit} request weight per {self.weight_window_s:g} seconds"

    def _api(self, path: str, query: str, weight: int, client_ip: str) -> Response:
        now = self._clock()
        fault_ban_until = self.faults_state.ban_until
        if now < fault_ban_until:
            return self._banned(fault_ban_until, now, client_ip)
        storm_retry_after = self.faults_state.take_storm()
        if storm_retry_after is not None:
            return self._too_many(self.limiter.used(), storm_retry_after, client_ip)
        admission = self.limiter.admit(weight)
        if admission.status == 418:
            return self._banned(admission.banned_until, now, client_ip)
        if admission.status == 429:
            return self._too_many(admission.used, admission.retry_after, client_ip)
        headers = self._weight_headers(admission.used)
        try:
            params = self._params(query)
            if path == "/api/v3/ping":
                return _json(200, {}, headers)
            if path == "/api/v3/time":
                return _json(200, {"serverTime": int(self._clock() * 1000)}, headers)
            if path == "/api/v3/exchangeInfo":
                return _json(200, self._exchange_info(params), headers)
            rows = self._klines_params(params)
        except BinanceRequestError as exc:
            return _binance_error(400, exc.code, exc.msg, headers)
        body = json.dumps(rows, separators=(",", ":")).encode()
        if self.faults_state.take_malformed():
            # A body cut short, as when a proxy drops the connection mid-response.
            body = body[: max(1, len(body) // 2)] + b"\x00<html>"
        return Response(200, body, _JSON, headers)

    def _too_many(self, used: int, retry_after: int, client_ip: str) -> Response:
        headers = self._weight_headers(used)
        headers["Retry-After"] = str(retry_after)
        return _binance_error(
            429, -1003,
            f"Too many requests; current limit of IP({client_ip}) is {self._limit_text()}. "
            "Please use the websocket for live updates to avoid polling the API.",
            headers,
        )

    def _banned(self, until: float, now: float, client_ip: str) -> Response:
        headers = self._weight_headers()
        headers["Retry-After"] = str(max(1, math.ceil(until - now)))
        return _binance_error(
            418, -1003,
            f"Way too many requests; IP({client_ip}) banned until {int(until * 1000)}. "
            "Please use the websocket for live updates to avoid bans.",
            headers,
        )

    @staticmethod
    def _params(query: str) -> dict[str, str]:
        values = parse_qs(query, keep_blank_values=True)
        if any(len(v) > 1 for v in values.values()):
            raise BinanceRequestError(-1101, "Duplicate values for a parameter detected.")
        return {k: v[0] for k, v in values.items()}

    def _symbol(self, value: str | None, name: str = "symbol") -> str:
        if not value:
            raise _mandatory(name)
        if not _BINANCE_SYMBOL_RE.match(value):
            raise _illegal(name, "^[A-Z0-9-_.]{1,20}$")
        if value not in self._symbol_set:
            raise BinanceRequestError(-1121, "Invalid symbol.")
        return value

    # --- exchangeInfo -----------------------------------------------------------------------------

    def _exchange_info(self, params: dict[str, str]) -> dict[str, Any]:
        if "symbol" in params and "symbols" in params:
            raise BinanceRequestError(-1128, "Combination of optional parameters invalid.")
        if "symbol" in params:
            chosen = [self._symbol(params["symbol"])]
        elif "symbols" in params:
            try:
                names = json.loads(params["symbols"])
            except ValueError:
                names = None
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise _illegal("symbols", '^\\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\\]$')
            chosen = [self._symbol(n, "symbols") for n in dict.fromkeys(names)]
        else:
            chosen = list(self.symbols)
        if self.weight_window_s == 60:
            weight_limit = {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1}
        else:
            weight_limit = {"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND",
                            "intervalNum": max(1, round(self.weight_window_s))}
        return {
            "timezone": "UTC",
            "serverTime": int(self._clock() * 1000),
            "rateLimits": [
                {**weight_limit, "limit": self.weight_limit},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": [_symbol_info(s) for s in chosen],
        }

    # --- klines -----------------------------------------------------------------------------------

    def _klines_params(self, params: dict[str, str]) -> list[list[Any]]:
        symbol = self._symbol(params.get("symbol"))
        interval = params.get("interval")
        if not interval:
            raise _mandatory("interval")
        if interval not in INTERVALS_MS:
            raise BinanceRequestError(-1120, "Invalid interval.")
        times: dict[str, int | None] = {}
        for name in ("startTime", "endTime", "limit"):
            value = params.get(name)
            if value is None or value == "":
                times[name] = None
            elif not _DIGITS_RE.match(value):
                raise _illegal(name, "^[0-9]{1,20}$")
            else:
                times[name] = int(value)
        limit = KLINES_DEFAULT_LIMIT if times["limit"] is None else times["limit"]
        if limit < 1:
            raise BinanceRequestError(-1130, "Data sent for parameter 'limit' is not valid.")
        start, end = times["startTime"], times["endTime"]
        if start is not None and end is not None and start > end:
            raise BinanceRequestError(-1023, "Start time is greater than end time.")
        return self.klines(symbol, interval, start, end, min(limit, KLINES_MAX_LIMIT))

    def klines(
        self,
        symbol: str,
        interval: str,
        start_time: int | None = None,
        end_time: int | None = None,
        limit: int = KLINES_DEFAULT_LIMIT,
    ) -> list[list[Any]]:
        """The klines /api/v3/klines answers (gaps applied), without HTTP, weight or other faults."""
        if symbol not in self._symbol_set:
            raise InputError(f"symbol {symbol!r} is not simulated", hint=f"use one of {len(self.symbols)} symbols")
        if interval not in INTERVALS_MS:
            raise InputError(f"unknown interval {interval!r}", hint=f"use one of {', '.join(INTERVALS_MS)}")
        interval_ms = INTERVALS_MS[interval]
        offset = interval_offset(interval_ms)
        now_ms = int(self._clock() * 1000)
        lo = self.market.first_open_time(interval_ms)
        hi = (now_ms - offset) // interval_ms * interval_ms + offset  # the candle still open
        if start_time is not None:
            lo = max(lo, -((offset - start_time) // interval_ms) * interval_ms + offset)
        if end_time is not None:
            hi = min(hi, (end_time - offset) // interval_ms * interval_ms + offset)
        limit = max(1, min(limit, KLINES_MAX_LIMIT))
        gaps = [g for g in self.faults_state.gaps if g.covers(symbol, interval)]
        open_times = _select_open_times(lo, hi, interval_ms, limit, ascending=start_time is not None, gaps=gaps)
        rows = self.market.candles(symbol, interval_ms, open_times, now_ms)
        return _format_klines(symbol, open_times, interval_ms, rows)

    # --- Fear & Greed -----------------------------------------------------------------------------

    def _fng(self, query: str) -> Response:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        limit_text = params.get("limit", "1") or "1"
        if not limit_text.isdigit():
            return _json(200, {"name": "Fear and Greed Index", "data": [],
                               "metadata": {"error": "Limit must be a number."}})
        limit = int(limit_text)
        date_format = params.get("date_format", "")
        now = self._clock()
        today = int(now * 1000) // DAY_MS
        first = FNG_FIRST_DAY if limit == 0 else today - limit + 1
        values = self.fear_greed.values(first, today)
        data: list[dict[str, str]] = []
        for day, value in reversed(values):
            entry = {
                "value": str(value),
                "value_classification": fng_classification(value),
                "timestamp": _fng_date(day, date_format),
            }
            if not data:
                entry["time_until_update"] = str(int((today + 1) * 86400 - now))
            data.append(entry)
        return _json(200, {"name": "Fear and Greed Index", "data": data, "metadata": {"error": None}})

    # --- FRED -------------------------------------------------------------------------------------

    def _fred(self, query: str) -> Response:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        file_type = params.get("file_type", "xml")
        as_json = file_type == "json"

        def error(message: str) -> Response:
            if as_json:
                return _json(400, {"error_code": 400, "error_message": message})
            xml = ET.tostring(ET.Element("error", code="400", message=message), encoding="unicode")
            document = '<?xml version="1.0" encoding="utf-8" ?>\n' + xml
            return Response(400, document.encode(), "text/xml; charset=UTF-8")

        if file_type not in ("json", "xml"):
            return error("Bad Request.  Variable file_type is not one of the values: 'xml', 'json'.")
        api_key = params.get("api_key", "")
        if not api_key:
            return error(FRED_ERRORS["no_key"])
        if self.fred_api_key is not None and api_key != self.fred_api_key:
            return error(FRED_ERRORS["bad_key"])
        series_id = params.get("series_id", "")
        if not series_id:
            return error(FRED_ERRORS["no_series_id"])
        if not self.fred.known(series_id):
            return error(FRED_ERRORS["no_series"])
        bounds: dict[str, dt.date | None] = {}
        for name in ("observation_start", "observation_end"):
            text = params.get(name)
            if not text:
                bounds[name] = None
                continue
            try:
                bounds[name] = dt.date.fromisoformat(text)
            except ValueError:
                return error(f'Bad Request.  Variable {name} can not be "{text}".')
        start, end = bounds["observation_start"], bounds["observation_end"]
        if start and end and start > end:
            return error("Bad Request.  The value for variable observation_start is later than the "
                         "value for variable observation_end.")
        units = params.get("units", "lin")
        if units != "lin":
            return error("Bad Request.  Variable units is not one of the values: 'lin'.")
        sort_order = params.get("sort_order", "asc")
        if sort_order not in ("asc", "desc"):
            return error("Bad Request.  Variable sort_order is not one of the values: 'asc', 'desc'.")
        try:
            limit = int(params.get("limit", "100000"))
            offset = int(params.get("offset", "0"))
        except ValueError:
            return error("Bad Request.  Variables limit and offset must be integers.")
        if not 1 <= limit <= 100000 or offset < 0:
            return error("Bad Request.  Variable limit is not between 1 and 100000, or offset is negative.")
        observations = self.fred.observations(series_id, start, end)
        if sort_order == "desc":
            observations.reverse()
        count = len(observations)
        page = observations[offset:offset + limit]
        today = date_of_day(int(self._clock() * 1000) // DAY_MS).isoformat()
        header = {
            "realtime_start": today,
            "realtime_end": today,
            "observation_start": start.isoformat() if start else "1776-07-04",
            "observation_end": end.isoformat() if end else "9999-12-31",
            "units": "lin",
            "output_type": 1,
            "file_type": file_type,
            "order_by": "observation_date",
            "sort_order": sort_order,
            "count": count,
            "offset": offset,
            "limit": limit,
        }
        items = [
            {"realtime_start": today, "realtime_end": today, "date": day.isoformat(), "value": value}
            for day, value in page
        ]
        if as_json:
            return _json(200, {**header, "observations": items})
        root = ET.Element("observations", {k: str(v) for k, v in header.items()} | {"file_type": "text/xml"})
        for item in items:
            ET.SubElement(root, "observation", item)
        xml = ET.tostring(root, encoding="unicode")
        return Response(200, ('<?xml version="1.0" encoding="utf-8" ?>\n' + xml).encode(), "text/xml; charset=UTF-8")

    # --- the control plane ------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> Response:
        try:
            if path == "/_sim/faults":
                if method == "GET":
                    return _json(200, self.faults())
                if method == "DELETE":
                    self.clear_faults()
                    return _json(200, self.faults())
                if method == "POST":
                    return _json(200, self.set_faults(**_json_object(body)))
            elif path == "/_sim/stats" and method == "GET":
                stats = self.stats()
                stats["status"] = {str(k): v for k, v in stats["status"].items()}
                return _json(200, stats)
            elif path == "/_sim/down" and method == "POST":
                request = _json_object(body)
                mode = request.get("mode", "refuse")
                for_s = request.get("for_s")
                if for_s is not None:
                    for_s = _number("for_s", for_s, float)
                if mode == "refuse":
                    if for_s is None:
                        raise InputError(
                            "going down with connection refused over HTTP needs for_s",
                            hint="nothing could bring it back up: pass for_s, or use Simulator.go_down() in-process",
                        )
                    # Answer first; the port closes just after.
                    threading.Timer(0.05, self._go_down_unless_stopped, args=("refuse", for_s)).start()
                else:
                    self.go_down(mode, for_s)
                return _json(200, {"down": mode, "for_s": for_s})
            elif path == "/_sim/up" and method == "POST":
                self.come_up()
                return _json(200, {"down": None})
            else:
                return _json(404, {"error": f"no control endpoint {method} {path}"})
            return _json(405, {"error": f"{method} is not allowed on {path}"})
        except InputError as exc:
            return _json(400, {"error": str(exc)})


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise InputError("the request body is not JSON", hint='send e.g. {"slow_s": 2}') from None
    if not isinstance(value, dict):
        raise InputError("the request body must be a JSON object", hint='send e.g. {"slow_s": 2}')
    return value


def _select_open_times(
    lo: int, hi: int, interval_ms: int, limit: int, ascending: bool, gaps: list[Gap]
) -> np.ndarray:
    """Up to `limit` open times in [lo, hi] not inside a gap: the oldest when ascending, else the newest."""
    if hi < lo:
        return np.empty(0, dtype=np.int64)
    if not gaps:
        if ascending:
            return np.arange(lo, min(hi, lo + (limit - 1) * interval_ms) + 1, interval_ms, dtype=np.int64)
        return np.arange(max(lo, hi - (limit - 1) * interval_ms), hi + 1, interval_ms, dtype=np.int64)
    chunk = max(4 * limit, 4096)
    found: list[np.ndarray] = []
    total = 0
    cursor = lo if ascending else hi
    while total < limit and (cursor <= hi if ascending else cursor >= lo):
        if ascending:
            block = np.arange(cursor, min(hi, cursor + (chunk - 1) * interval_ms) + 1, interval_ms, dtype=np.int64)
            cursor = int(block[-1]) + interval_ms
        else:
            block = np.arange(max(lo, cursor - (chunk - 1) * interval_ms), cursor + 1, interval_ms, dtype=np.int64)
            cursor = int(block[0]) - interval_ms
        keep = np.ones(len(block), dtype=bool)
        for gap in gaps:
            keep &= (block < gap.start_ms) | (block >= gap.end_ms)
        block = block[keep]
        found.append(block if ascending else block[::-1])
        total += len(block)
    times = np.concatenate(found)[:limit] if found else np.empty(0, dtype=np.int64)
    return times if ascending else times[::-1].copy()


def _format_klines(symbol: str, open_times: np.ndarray, interval_ms: int, rows: np.ndarray) -> list[list[Any]]:
    """Binance kline arrays: times and trades as numbers, prices and volumes as 8-decimal strings."""
    assert rows.shape[1] == N_COLUMNS
    out = []
    for t, r in zip(open_times.tolist(), rows.tolist(), strict=True):
        out.append([
            t, f"{r[0]:.8f}", f"{r[1]:.8f}", f"{r[2]:.8f}", f"{r[3]:.8f}", f"{r[4]:.8f}",
            t + interval_ms - 1, f"{r[5]:.8f}", int(r[6]), f"{r[7]:.8f}", f"{r[8]:.8f}", "0",
        ])
    return out


def _fng_date(day: int, date_format: str) -> str:
    """The timestamp of a day as alternative.me writes it: epoch seconds, or a date with date_format."""
    date = date_of_day(day)
    formats = {"us": "%m-%d-%Y", "cn": "%Y-%m-%d", "kr": "%Y-%m-%d", "world": "%d-%m-%Y"}
    if date_format in formats:
        return date.strftime(formats[date_format])
    return str(day * 86400)


def _symbol_info(symbol: str) -> dict[str, Any]:
    """One entry of exchangeInfo's symbols, with the filters a client reads (tick size, step size)."""
    p = symbol_profile(symbol)
    return {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": p.base_asset,
        "baseAssetPrecision": 8,
        "quoteAsset": p.quote_asset,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": f"{p.tick_size:.8f}", "maxPrice": "1000000.00000000",
             "tickSize": f"{p.tick_size:.8f}"},
            {"filterType": "LOT_SIZE", "minQty": f"{p.step_size:.8f}", "maxQty": "9000000.00000000",
             "stepSize": f"{p.step_size:.8f}"},
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000", "maxQty": "1000000.00000000",
             "stepSize": "0.00000000"},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }
