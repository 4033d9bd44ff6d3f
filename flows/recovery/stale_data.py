"""Runbook scenario 2, data staleness: is the exchange reachable, how much weight is used, backfill exactly the
stale windows, validate again; still failing: L2 with the failing symbols."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from crypto_agent import incidents, recovery
from crypto_agent.collector import CollectSummary, backfill
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import BinanceClient, IPBanned
from crypto_agent.incidents import ESCALATED, RECOVERED, RESOLVED
from crypto_agent.quality import check_data
from crypto_agent.store import open_store
from crypto_agent.universe import TIMEFRAMES, validate_symbol
from flows.common import retry_if_transient, run_settings
from flows.daily import check_data_quality
from flows.events import STORE_RESOURCE
from flows.recovery.contract import Handover, Overrides, Summary, Trigger, recovery_flow
from flows.recovery.skeleton import Absorbed, recovery_incident


# No task-level retries: the client already retries timeouts and 5xx with backoff (request_retries), and an
# exchange still down after that is the runbook's cue to tell L2, not to wait longer.
@task(name="check-exchange", timeout_seconds=300, cache_policy=NO_CACHE)
def check_exchange(settings: dict[str, Any] | None) -> recovery.ExchangeStatus:
    """Is the exchange up (its server time), and how much of the request weight is used (the runbook's 1 and 2)."""
    cfg = run_settings(settings)
    with BinanceClient.from_settings(cfg) as client:
        server_ms = client.server_time()
        limits = client.rate_limit_status()
    return recovery.ExchangeStatus(server_ms, server_ms - int(time.time() * 1000), limits)


def stale_windows_of(event: dict[str, Any] | None) -> tuple[list[list[Any]] | None, list[str]]:
    """The failing windows the event names, checked ([symbol, timeframe, start_ms, end_ms]); None when it names
    none or only part of them (the data-validation event keeps at most 500); the entries skipped and why."""
    payload = incidents.event_payload(event)
    raw = payload.get("failing_windows")
    if not isinstance(raw, list) or not raw:
        return None, []
    total = payload.get("windows_total")
    if isinstance(total, int) and total > len(raw):
        return None, [f"the event lists {len(raw)} of {total} windows: checking the store afresh"]
    windows, skipped = [], []
    for item in raw:
        try:
            symbol = validate_symbol(str(item["symbol"]))
            tf = str(item["timeframe"])
            start, end = int(item["start_ms"]), int(item["end_ms"])
            if tf not in TIMEFRAMES or start > end:
                raise ValueError(f"timeframe {tf!r}, {start} > {end}" if start > end else f"timeframe {tf!r}")
        except (KeyError, TypeError, ValueError, CryptoAgentError) as exc:
            skipped.append(f"{str(item)[:120]}: {getattr(exc, 'message', exc)}")
            continue
        windows.append([symbol, tf, start, end])
    return windows, skipped


@task(name="backfill-stale-windows", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def backfill_stale_windows(settings: dict[str, Any] | None, windows: list[list[Any]]) -> CollectSummary:
    """Fetch and store exactly these (symbol, timeframe, start_ms, end_ms) windows from the exchange."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        return backfill(store, client, [(s, tf, a, b) for s, tf, a, b in windows])


@recovery_flow("recover-stale-data", __doc__, timeout_seconds=3600)
def recover_stale_data(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                       handover: Handover = None) -> Summary:
    """Backfill the stale or missing candle windows and validate; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    with recovery_incident("stale-data", STORE_RESOURCE, event, cfg, handover, guard=[STORE_RESOURCE]) as run:
        if isinstance(run, Absorbed):
            return run.result
        impact = "Backtest and live trading on stale data"

        # 1. is the exchange up? 2. how much of the request weight is used?
        try:
            exchange = check_exchange(settings)
        except CryptoAgentError as exc:
            run.act("check-exchange", exc.message, ok=False)
            # the runbook's cells: L2 checks the Binance API; L3 contacts Binance (banned, or down too long)
            since = run.incident.needs_person_since or run.incident.detected_at
            run.extra_levels.update(incidents.policy.exchange_levels(
                isinstance(exc, IPBanned), since, int(time.time() * 1000), cfg.exchange_down_l3_after_s,
                exc.message))
            return run.finish(ESCALATED, "escalated", summary=f"the exchange cannot be used: {exc.message}; "
                              "L2: check the Binance API status", impact=impact,
                              root_cause=incidents.root_cause.exchange_root_cause(exc))
        share = exchange.used_share
        run.act("check-exchange", f"server time {incidents.iso(exchange.server_time_ms)} (skew "
                f"{exchange.skew_ms / 1000:+.1f} s); used weight {exchange.limits.used_weight} of "
                f"{exchange.limits.weight_limit}" + (f" ({share:.0%})" if share is not None else ""))

        # 3. the stale windows: those the event names, else a fresh check of the store
        windows, skipped = stale_windows_of(event)
        for note in skipped:
            run.act("event-window-skipped", note, ok=False)
        source = "the event"
        if windows is None:
            with open_store(cfg) as store:
                fresh = check_data(store, cfg, now_ms=exchange.server_time_ms)
            windows = [list(w) for w in fresh.failing_windows()]
            source = "a fresh check of the store"
        failing_symbols = sorted({w[0] for w in windows})
        run.act("windows", f"{len(windows)} window(s) from {source}: " + "; ".join(
            f"{s} {tf} {incidents.iso(a)}..{incidents.iso(b)}" for s, tf, a, b in windows[:20])
            + (f" and {len(windows) - 20} more" if len(windows) > 20 else ""))
        root_cause = incidents.root_cause.stale_root_cause(share, cfg.weight_safety_margin, failing_symbols)

        # 4. backfill exactly those windows
        filled = backfill_stale_windows(settings, windows) if windows else CollectSummary(mode="backfill")
        written = {f"{s} {tf}": n for (s, tf), n in sorted(filled.written.items())}
        run.act("backfill", f"{filled.total} candles written: " + (", ".join(
            f"{k} {n}" for k, n in written.items()) or "none")
            + (f"; failed: {dict(filled.failures)}" if filled.failures else ""), ok=not filled.failures)

        # 5. validate again: still failing goes to L2 with the symbols
        validation = check_data_quality(settings)
        run.act("validate", "data checks pass" if validation.ok else "; ".join(validation.reasons[:5]),
                ok=validation.ok)
        details = {"windows": windows, "written": written, "failing_symbols": validation.failing_symbols}
        if not validation.ok:
            still = validation.failing_symbols
            missing = max((recovery.hours_between(w[2], w[3]) for w in validation.failing_windows()), default=0.0)
            return run.finish(ESCALATED, "escalated", summary=f"still failing after the backfill: {', '.join(still)} "
                              f"({'; '.join(validation.reasons[:3])})", impact=impact, root_cause=root_cause,
                              data_lost_hours=missing, **details)
        return run.finish(RESOLVED, RECOVERED, summary=f"backfilled {filled.total} candles of "
                          f"{', '.join(failing_symbols) or 'no symbol'}; data checks pass",
                          impact=impact, root_cause=root_cause, data_lost_hours=0, **details)
