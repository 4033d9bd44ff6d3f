"""Sentiment and macro data: the Crypto Fear & Greed index and FRED series, fetched and upserted idempotently.

The APIs are alternative.me's ``/fng/`` and FRED's ``/series/observations`` (the bundled simulator
serves both shapes). Nothing here retries: errors say whether they are worth retrying
(``retryable``), and the flows put the retry policy on their tasks. The FRED key never appears in
an error message or a log line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.errors import CryptoAgentError, InputError, StoreError
from crypto_agent.schema import macro_series, sentimento_mercado
from crypto_agent.settings import Settings
from crypto_agent.store import Store

DEFAULT_TIMEOUT_S = 10.0
FRED_FIRST_START = date(2010, 1, 1)  # history loaded for a series new to the store
FRED_REVISION_DAYS = 90  # FRED revises recent observations (CPI, M2): re-read this far back
DAY_MS = 86_400_000
FRED_MAX_PAGES = 20  # FRED serves up to 100,000 observations a page; no series we load needs more than one


class SentimentError(CryptoAgentError):
    """A sentiment or macro source failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = False,
                 summary: SentimentMacroSummary | None = None) -> None:
        super().__init__(message, hint)
        self.retryable = retryable
        self.summary = summary


class FredKeyError(SentimentError):
    """FRED refused the API key (missing, malformed or not registered)."""


@dataclass
class SentimentMacroSummary:
    """What one sentiment/macro update did: rows per source, what it skipped and why."""

    fear_greed_rows: int | None = None
    fred_rows: dict[str, int] = field(default_factory=dict)
    fred_skipped: bool = False
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every source that ran succeeded."""
        return not self.errors

    @property
    def message(self) -> str:
        """One paragraph for an operator: what was written, skipped and failed."""
        parts = []
        if self.fear_greed_rows is not None:
            parts.append(f"Fear & Greed: {self.fear_greed_rows} days upserted into sentimento_mercado")
        if self.fred_rows:
            per = ", ".join(f"{s} {n}" for s, n in self.fred_rows.items())
            parts.append(f"FRED: {sum(self.fred_rows.values())} observations upserted into macro_series ({per})")
        parts.extend(f"warning: {w}" for w in self.warnings)
        parts.extend(f"error: {e}" for e in self.errors)
        return "\n".join(parts) or "nothing done"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _day_ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def _get_json(client: httpx.Client, url: str, params: dict[str, Any], what: str) -> Any:
    """GET a JSON document; SentimentError on network trouble, a non-2xx status or a bad body.

    Messages name `what` and the URL without its query, so a key passed as a parameter never leaks.
    """
    try:
        response = client.get(url, params=params)
    except httpx.TimeoutException:
        raise SentimentError(f"{what} at {url} did not answer in time", hint="check that it is up; try again later",
                             retryable=True) from None
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise SentimentError(
            f"cannot reach {what} at {url}: {reason}",
            hint="check that the service (or the simulator, `crypto-agent simulator`) runs and the URL setting",
            retryable=True,
        ) from None
    if response.status_code >= 400:
        return response  # the caller knows the API's error shapes
    try:
        return response.json()
    except ValueError:
        raise SentimentError(f"{what} at {url} sent a body that is not JSON (HTTP {response.status_code})",
                             hint="try again later", retryable=True) from None


def _http_error(response: httpx.Response, what: str, url: str) -> SentimentError:
    status = response.status_code
    retryable = status >= 500 or status == 429
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("error_message") or body.get("error") or body.get("message") or "")
    except ValueError:
        pass
    detail = f": {detail[:300]}" if detail else ""
    return SentimentError(f"{what} at {url} answered HTTP {status}{detail}",
                          hint="try again later" if retryable else "check the URL and parameters in the settings",
                          retryable=retryable)


def _client(client: httpx.Client | None, timeout_s: float) -> tuple[httpx.Client, bool]:
    if client is not None:
        return client, False
    return httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True,
                        headers={"User-Agent": "crypto-agent"}), True


# --- Fear & Greed ---


def fetch_fear_greed(base_url: str, limit: int = 30, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     client: httpx.Client | None = None) -> list[dict[str, Any]]:
    """The newest `limit` days of the Fear & Greed index (0: all), as rows of sentimento_mercado."""
    if limit < 0:
        raise InputError(f"limit must be >= 0 (0 means all), got {limit}", hint="use e.g. --limit 30")
    what = "the Fear & Greed API"
    http, owned = _client(client, timeout_s)
    try:
        body = _get_json(http, base_url, {"limit": limit, "format": "json"}, what)
    finally:
        if owned:
            http.close()
    if isinstance(body, httpx.Response):
        raise _http_error(body, what, base_url)
    meta_error = (body.get("metadata") or {}).get("error") if isinstance(body, dict) else None
    if meta_error:
        raise SentimentError(f"{what} at {base_url} reported an error: {meta_error}",
                             hint="check fear_greed_url and fear_greed_limit", retryable=False)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise SentimentError(f"{what} at {base_url} sent no 'data' list", hint="try again later", retryable=True)
    fetched_at = _now_ms()
    rows: dict[int, dict[str, Any]] = {}
    for item in data:
        try:
            value = int(item["value"])
            day = datetime.fromtimestamp(int(item["timestamp"]), tz=UTC).date()
            classification = str(item["value_classification"])
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            raise SentimentError(f"{what} at {base_url} sent a malformed entry: {str(item)[:200]}",
                                 hint="try again later", retryable=True) from None
        if not 0 <= value <= 100:
            raise SentimentError(f"{what} at {base_url} sent an index of {value}, outside 0..100",
                                 hint="check fear_greed_url points at the Fear & Greed API", retryable=False)
        ts = _day_ms(day)  # one row per UTC day, whatever time of day the source stamps
        rows[ts] = {"timestamp": ts, "date": day.isoformat(), "value": value,
                    "classification": classification[:32], "fetched_at": fetched_at}
    return [rows[k] for k in sorted(rows)]


def update_fear_greed(store: Store, base_url: str, limit: int = 30, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      client: httpx.Client | None = None) -> int:
    """Fetch the Fear & Greed index and upsert it into sentimento_mercado; the number of days written."""
    rows = fetch_fear_greed(base_url, limit, timeout_s=timeout_s, client=client)
    if not rows:
        return 0
    stmt = sqlite_insert(sentimento_mercado)
    stmt = stmt.on_conflict_do_update(
        index_elements=["timestamp"],
        set_={c: stmt.excluded[c] for c in ("date", "value", "classification", "fetched_at")},
    )
    _write(store, stmt, rows, "sentimento_mercado")
    return len(rows)


# --- FRED ---


def fetch_fred_series(base_url: str, api_key: str, series_id: str, start: date | None = None, *,
                      timeout_s: float = DEFAULT_TIMEOUT_S, client: httpx.Client | None = None) -> list[dict[str, Any]]:
    """Observations of one FRED series from `start` (all when None), as rows of macro_series."""
    if not api_key:
        raise FredKeyError("no FRED API key", hint="set CRYPTO_AGENT_FRED_API_KEY or the FRED Secret block")
    url = base_url.rstrip("/") + "/series/observations"
    what = f"FRED (series {series_id})"
    params: dict[str, Any] = {"series_id": series_id, "api_key": api_key, "file_type": "json"}
    if start is not None:
        params["observation_start"] = start.isoformat()
    observations: list[Any] = []
    http, owned = _client(client, timeout_s)
    try:
        for _page in range(FRED_MAX_PAGES):
            body = _get_json(http, url, {**params, "offset": len(observations)}, what)
            if isinstance(body, httpx.Response):
                err = _http_error(body, what, url)
                if body.status_code in (400, 401, 403) and "api_key" in err.message.lower():
                    raise FredKeyError(
                        f"FRED refused the API key: {err.message.split(': ', 1)[-1]}",
                        hint="set a valid key (32 lower-case letters and digits) in the FRED Secret block or "
                        "CRYPTO_AGENT_FRED_API_KEY; get one at https://fred.stlouisfed.org/docs/api/api_key.html",
                        retryable=False,
                    )
                raise err
            page = body.get("observations") if isinstance(body, dict) else None
            if not isinstance(page, list):
                raise SentimentError(f"{what} at {url} sent no 'observations' list", hint="try again later",
                                     retryable=True)
            observations.extend(page)
            try:
                count = int(body.get("count", 0))
            except (TypeError, ValueError):
                count = 0
            if not page or len(observations) >= count:
                break
    finally:
        if owned:
            http.close()
    fetched_at = _now_ms()
    rows = []
    for obs in observations:
        try:
            day = date.fromisoformat(str(obs["date"]))
            raw = str(obs["value"]).strip()
            value = None if raw in (".", "") else float(raw)  # FRED writes "." for a missing value
        except (KeyError, TypeError, ValueError):
            raise SentimentError(f"{what} at {url} sent a malformed observation: {str(obs)[:200]}",
                                 hint="try again later", retryable=True) from None
        rows.append({"series_id": series_id, "date": day.isoformat(), "timestamp": _day_ms(day),
                     "value": value, "fetched_at": fetched_at})
    return rows


def newest_fred_date(store: Store, series_id: str) -> date | None:
    """Date of the newest stored observation of a series, or None."""
    with store.engine.connect() as conn:
        v = conn.execute(select(func.max(macro_series.c.date)).where(macro_series.c.series_id == series_id)).scalar()
    return date.fromisoformat(v) if v else None


def update_fred(store: Store, base_url: str, api_key: str, series: Sequence[str] = ("DGS10",),
                start: date | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                client: httpx.Client | None = None) -> dict[str, int]:
    """Fetch FRED series and upsert them into macro_series; observations written per series.

    Without `start`, each series is read from FRED_REVISION_DAYS before its newest stored date
    (FRED revises), or from FRED_FIRST_START when it is new. A refused key stops at once
    (FredKeyError); other failures skip that series and are raised together after the rest.
    """
    if not series:
        raise InputError("no FRED series to load", hint="set fred_series, e.g. DGS10,DFF")
    written: dict[str, int] = {}
    failures: list[SentimentError] = []
    http, owned = _client(client, timeout_s)
    try:
        for series_id in series:
            since = start
            if since is None:
                newest = newest_fred_date(store, series_id)
                since = newest - timedelta(days=FRED_REVISION_DAYS) if newest else FRED_FIRST_START
            try:
                rows = fetch_fred_series(base_url, api_key, series_id, since, timeout_s=timeout_s, client=http)
            except FredKeyError:
                raise
            except SentimentError as exc:
                failures.append(exc)
                if exc.retryable:
                    break  # FRED is down or overloaded: the other series would fail the same way
                continue
            if rows:
                stmt = sqlite_insert(macro_series)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["series_id", "date"],
                    set_={c: stmt.excluded[c] for c in ("timestamp", "value", "fetched_at")},
                )
                _write(store, stmt, rows, "macro_series")
            written[series_id] = len(rows)
    finally:
        if owned:
            http.close()
    if failures:
        done = ", ".join(f"{s} {n}" for s, n in written.items()) or "none"
        not_tried = [s for s in series if s not in written][len(failures):]
        rest = f"; not tried: {', '.join(not_tried)}" if not_tried else ""
        raise SentimentError(
            f"FRED failed ({'; '.join(f.message for f in failures)}); written: {done}{rest}",
            hint=failures[0].hint, retryable=all(f.retryable for f in failures),
        )
    return written


def _write(store: Store, stmt: Any, rows: list[dict[str, Any]], table: str) -> None:
    try:
        with store.engine.begin() as conn:
            conn.execute(stmt, rows)
    except SQLAlchemyError as exc:
        raise StoreError(
            f"writing {len(rows)} rows into {table} failed: {getattr(exc, 'orig', exc)}",
            hint="nothing of this batch was written; check disk space and `crypto-agent check-integrity`",
        ) from None


# --- both, as the runbook's 02:00 job ---


def update_sentiment_macro(store: Store, settings: Settings, fred_api_key: str | None = None) -> SentimentMacroSummary:
    """The Fear & Greed index, then the FRED series (skipped with a warning without a key); what was done.

    Both parts always run; if one failed, SentimentError carries the summary of what the other did.
    The key: the argument (a Secret block's value), else settings.fred_api_key.
    """
    summary = SentimentMacroSummary()
    failures: list[SentimentError] = []
    timeout_s = getattr(settings, "request_timeout_s", DEFAULT_TIMEOUT_S)
    try:
        summary.fear_greed_rows = update_fear_greed(store, settings.fear_greed_url, settings.fear_greed_limit,
                                                    timeout_s=timeout_s)
    except SentimentError as exc:
        failures.append(exc)
        summary.errors.append(f"Fear & Greed: {exc.message}")
    key = fred_api_key
    if key is None and settings.fred_api_key is not None:
        key = settings.fred_api_key.get_secret_value()
    if not key:
        summary.fred_skipped = True
        summary.warnings.append(
            "FRED skipped: no API key (set the FRED Secret block or CRYPTO_AGENT_FRED_API_KEY); "
            "macro_series was not updated"
        )
    else:
        try:
            summary.fred_rows = update_fred(store, settings.fred_url, key, settings.fred_series, timeout_s=timeout_s)
        except SentimentError as exc:
            failures.append(exc)
            summary.errors.append(f"FRED: {exc.message}")
    if failures:
        raise SentimentError(
            "sentiment/macro update failed:\n" + summary.message,
            hint=failures[0].hint,
            retryable=all(f.retryable for f in failures),
            summary=summary,
        )
    return summary
