"""The bundled exchange simulator: Binance spot REST, Crypto Fear & Greed and FRED on 127.0.0.1.

A real Binance client works against it unchanged, pointed at its URL::

    from crypto_agent.simulator import Simulator
    with Simulator(port=0, weight_limit=6000, seed=0, history_days=800) as sim:
        Spot(base_url=sim.url).klines("BTCUSDT", "1h", limit=5)

Command line: ``crypto-agent simulator --host 127.0.0.1 --port 8765 [--weight-limit N] [--seed N]
[--history-days N]`` serves until SIGTERM or Ctrl-C.

Binance (the spot REST API, same paths, parameters, arrays, error codes and headers)
    GET /api/v3/ping (weight 1) -> {}
    GET /api/v3/time (1) -> {"serverTime": ms}
    GET /api/v3/exchangeInfo[?symbol=X | ?symbols=["X","Y"]] (20) -> timezone, serverTime, rateLimits
        (the configured weight limit), symbols with status, assets and PRICE_FILTER/LOT_SIZE filters.
    GET /api/v3/klines?symbol&interval[&startTime][&endTime][&limit] (2) -> [[open_time, "open", "high",
        "low", "close", "volume", close_time, "quote_volume", trades, "taker_base", "taker_quote", "0"]],
        oldest first: from startTime up when given, else the newest `limit` up to endTime or now,
        the still-open current candle included. limit defaults to 500 and is capped at 1000.
        Intervals 1m 3m 5m 15m 30m 1h 2h 4h 6h 8h 12h 1d 3d 1w (weeks start on Monday).
    Errors: 400 with {"code", "msg"}: -1102 missing parameter, -1100 illegal characters, -1121 invalid
        symbol, -1120 invalid interval, -1130 bad limit, -1023 startTime after endTime, -1101 duplicate
        parameter. Unknown paths: 404 with an HTML body, as Binance's front end answers.
    Every /api/ response carries X-MBX-USED-WEIGHT and X-MBX-USED-WEIGHT-1M: the weight used in the
    current window (fixed windows of weight_window_s, aligned to the epoch). A request that would go
    over weight_limit gets 429 {"code": -1003} with Retry-After (seconds to the next window) and is not
    charged; after 3 such 429s in one window the next over-limit request gets the IP banned: 418 with
    Retry-After, for 2 * weight_window_s.

Candles are deterministic for (seed, symbol, interval, open time) and exist from the start of the day
`history_days` before the simulator was built up to now. Each symbol has its own price level,
volatility and liquidity (see market.py); every interval aggregates the same one-minute candles.

Crypto Fear & Greed (alternative.me): GET /fng/?limit=N[&format=json][&date_format=us|cn|kr|world]
    -> {"name": "Fear and Greed Index", "data": [{"value": "40", "value_classification": "Fear",
    "timestamp": "<epoch s of 00:00 UTC of the day>"}, ...newest first], "metadata": {"error": null}};
    limit defaults to 1, 0 means every day since 2018-02-01; like alternative.me, only the newest entry
    has "time_until_update" (seconds to the next 00:00 UTC). Deterministic per (seed, day); it follows
    the simulated BTCUSDT two-week return.

FRED: GET /fred/series/observations?series_id=S&api_key=K&file_type=json[&observation_start=YYYY-MM-DD]
    [&observation_end=YYYY-MM-DD][&sort_order=asc|desc][&limit=N][&offset=N] -> {"realtime_start",
    "realtime_end", "observation_start", "observation_end", "units": "lin", "output_type", "file_type",
    "order_by", "sort_order", "count", "offset", "limit", "observations": [{"realtime_start",
    "realtime_end", "date", "value"}]}; file_type defaults to xml, as on FRED. Series: DGS10, DGS2,
    T10Y2Y, DTWEXBGS, VIXCLS (business days, "." on US federal holidays), DFF (every day), CPIAUCSL,
    M2SL (monthly, first of the month, published with a lag). Errors are 400 {"error_code": 400,
    "error_message": "Bad Request.  ..."}: api_key missing ("Variable api_key has not been set."),
    not registered (only when built with fred_api_key=...; otherwise any non-empty key works),
    unknown series ("The series does not exist."), bad dates.

Faults, for tests and rehearsals; in-process (``set_faults(**kw)`` merges, ``clear_faults()`` resets
everything and lifts a weight ban, ``faults()`` reads) or over HTTP on the running server, so a
simulator in another process can be driven (``POST /_sim/faults`` JSON merges, ``DELETE /_sim/faults``
resets, ``GET /_sim/faults``, ``GET /_sim/stats``):
    down: null | "503"     every request except /_sim/ answers 503
    slow_s: float          latency added to every response except /_sim/
    storm_429: int         the next N /api/ requests answer 429 with Retry-After: retry_after_s
    retry_after_s: int     (default 1)
    ban_418_s: float       every /api/ request answers 418 with Retry-After (seconds left) for that long
    malformed: int         the next N successful /api/v3/klines bodies are truncated (status 200)
    gaps: [{"symbol": str|null, "interval": str|null, "start_ms": int, "end_ms": int}]
                           klines opened in [start_ms, end_ms) are missing (null = every symbol/interval);
                           setting gaps replaces the list.
``go_down("refuse")`` closes the port and every open connection (connection refused);
``go_down("503")`` sets down="503"; ``come_up()`` undoes either, on the same port; ``for_s=`` makes it
come back by itself. Over HTTP: ``POST /_sim/down {"mode": "refuse"|"503", "for_s": s}`` (refuse needs
for_s) and ``POST /_sim/up``.

``stats()`` -> {"requests": {path: n}, "status": {code: n}, "used_weight": n}, counting every request
but those to /_sim/. ``klines(symbol, interval, start_time, end_time, limit)`` returns what the
klines endpoint would, without HTTP, so tests can compare.
"""

from __future__ import annotations

from crypto_agent.simulator.server import Simulator

__all__ = ["Simulator"]
