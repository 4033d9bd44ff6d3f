"""The runbook's daily data jobs: data-update (00:30 UTC) and its deadline, data-validation (01:00),
sentiment-macro-update (02:00). Thin flows over crypto_agent, with the operational policy on the decorators."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from blocks import load_block
from blocks.register import FRED_SECRET
from crypto_agent import backup
from crypto_agent.collector import CollectSummary, collect
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import BinanceClient
from crypto_agent.quality import DataQualityReport, check_data, timeframe_label
from crypto_agent.sentiment import SentimentMacroSummary, update_sentiment_macro
from crypto_agent.store import open_store
from crypto_agent.storelock import is_locked, lock_path
from crypto_agent.universe import timeframe as parse_timeframe
from flows.common import (
    UpdateIncomplete,
    retry_if_transient,
    run_settings,
    symbol_failure_is_transient,
)
from flows.events import STORE_OK, STORE_RESOURCE, STORE_STALE, STORE_UPDATE_LATE, emit
from flows.maintenance import backup_flow
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS

# The runbook's schedule of the update (prefect.yaml says the same; a test keeps them equal).
DATA_UPDATE_CRON = "30 0 * * *"
DATA_UPDATE_AT = (0, 30)  # hour, minute UTC
DATA_UPDATE_GRACE_MINUTES = 5.0
# Events carry at most this many windows; the rest is counted.
MAX_EVENT_WINDOWS = 500


class DataUpdateLate(CryptoAgentError):
    """No data-update run completed within the grace period after its scheduled time."""


class DataQualityFailed(CryptoAgentError):
    """The staleness, coverage or continuity check failed."""


class _Progress:
    """A Prefect progress artifact fed by the collector's progress callback, updated every few percent."""

    def __init__(self, key: str, description: str, step_pct: float = 5.0) -> None:
        # In a sync flow Prefect's dispatcher runs the sync version: an id, not a coroutine.
        self.artifact_id = cast(UUID, create_progress_artifact(progress=0.0, key=key, description=description))
        self.step_pct = step_pct
        self.shown = 0.0

    def __call__(self, done: int, total: int, label: str) -> None:
        pct = 100.0 if total == 0 else 100.0 * done / total
        if pct >= 100.0 or pct - self.shown >= self.step_pct:
            update_progress_artifact(artifact_id=self.artifact_id, progress=pct)
            self.shown = pct


def _candle_table(summary: CollectSummary, timeframes: list[str]) -> list[dict[str, Any]]:
    per_symbol = summary.by_symbol()
    symbols = sorted(set(per_symbol) | set(summary.failures))
    return [
        {
            "symbol": s,
            **{timeframe_label(tf): per_symbol.get(s, {}).get(tf, 0) for tf in timeframes},
            "failure": summary.failures.get(s, ""),
        }
        for s in symbols
    ]


# --- data-update ---


@task(
    name="collect-candles",
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_if_transient,
    timeout_seconds=1800,
)
def collect_candles(
    settings: dict[str, Any] | None,
    symbols: list[str] | None,
    timeframes: list[str] | None,
    mode: str,
    lookback_hours: float,
) -> dict[str, Any]:
    """The collector's run over the universe; a table artifact of candles written per symbol."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    syms = symbols or list(cfg.symbols)
    tfs = [parse_timeframe(t).interval for t in (timeframes or cfg.timeframes)]
    progress = _Progress("data-update-progress", f"{mode}: {len(syms)} symbols x {', '.join(tfs)}")
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        try:
            summary = collect(
                store, client, syms, tfs, mode=mode, lookback_hours=lookback_hours,
                initial_history_days=cfg.initial_history_days, progress=progress,
            )
        except CryptoAgentError as exc:
            partial: CollectSummary | None = getattr(exc, "summary", None)
            if partial is not None:
                create_table_artifact(
                    table=_candle_table(partial, tfs), key="data-update-candles",
                    description=f"Candles written before the run stopped: {exc.message}",
                )
            raise
    create_table_artifact(
        table=_candle_table(summary, tfs), key="data-update-candles",
        description=f"{summary.total} candles written ({mode}); {len(summary.failures)} symbol(s) failed",
    )
    logger.info("%s: %d candles written for %d symbols", mode, summary.total, len(syms))
    if summary.failures:
        retryable = any(symbol_failure_is_transient(s, m) for s, m in summary.failures.items())
        raise UpdateIncomplete(summary.failures, retryable=retryable, written=summary.total)
    return {"mode": mode, "written": summary.total, "by_symbol": summary.by_symbol()}


@flow(
    name="data-update",
    description="The collector's update of the whole universe and both timeframes (runbook: 00:30 UTC).",
    timeout_seconds=3 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def data_update(
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    mode: str = "update",
    lookback_hours: float = 72.0,
    settings: dict[str, Any] | None = None,
    first_backup: bool = True,
) -> dict[str, Any]:
    """Bring the store up to date (retrying what a retry can fix); then a first backup if none is good."""
    # first_backup: a corruption on the first day must have something to restore (issue 10).
    result = collect_candles(settings, symbols, timeframes, mode, lookback_hours)
    if first_backup:
        result["first_backup"] = take_first_backup(settings)
    return result


def take_first_backup(settings: dict[str, Any] | None) -> str | None:
    """Run the backup flow when no good backup exists; its path, None when one existed, or why not."""
    # A failed backup does not fail the update: the backup flow's own failure hook tells L1.
    logger = get_run_logger()
    cfg = run_settings(settings)
    try:
        backup.choose_backup(cfg.backup_dir)
        return None
    except backup.NoGoodBackup:
        pass
    if is_locked(cfg.db_path):
        logger.warning("no first backup: %s exists (a recovery holds the store)", lock_path(cfg.db_path))
        return "skipped: the store is locked by a recovery"
    logger.info("the store has no good backup yet: taking its first one")
    state = backup_flow(settings=settings, return_state=True)
    if not state.is_completed():
        logger.warning("the first backup failed: %s", state.message)
        return f"failed: {state.message}"
    return str(state.result()["backup"])


# --- the deadline of data-update ---


def last_scheduled_update(now: datetime) -> datetime:
    """The most recent scheduled data-update time (00:30 UTC) at or before `now`."""
    now = now.astimezone(UTC)
    at = now.replace(hour=DATA_UPDATE_AT[0], minute=DATA_UPDATE_AT[1], second=0, microsecond=0)
    return at if at <= now else at - timedelta(days=1)


@task(name="find-completed-updates", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=120)
def find_completed_updates(after: datetime, before: datetime) -> list[dict[str, Any]]:
    """data-update runs that reached Completed between `after` and `before`, from the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["data-update"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
                end_time=FlowRunFilterEndTime(after_=after, before_=before),
            ),
            limit=20,
        )
    return [
        {"name": r.name, "id": str(r.id), "end_time": r.end_time.isoformat() if r.end_time else None}
        for r in runs
    ]


@task(name="newest-h4-candle", timeout_seconds=120)
def newest_h4_candle(settings: dict[str, Any] | None) -> int | None:
    """Open time (ms) of the newest stored H4 candle, like the runbook's SELECT MAX(timestamp) FROM ohlcv_h4."""
    with open_store(run_settings(settings)) as store:
        newest = store.newest_by_symbol("4h")
    return max(newest.values()) if newest else None


@flow(
    name="data-update-deadline",
    description="The runbook's 'alert if > 5 min late': data-update completed within 5 minutes of 00:30 UTC.",
    timeout_seconds=30 * 60,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def data_update_deadline(
    scheduled_for: datetime | None = None,
    grace_minutes: float = DATA_UPDATE_GRACE_MINUTES,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fail (and so alert L1) when no data-update run completed by its deadline or the store lacks today's candles."""
    logger = get_run_logger()
    now = datetime.now(UTC)
    scheduled = (scheduled_for or last_scheduled_update(now)).astimezone(UTC)
    deadline = scheduled + timedelta(minutes=grace_minutes)
    if now < deadline:
        # Started early (a manual run): judge at the deadline, not before.
        time.sleep((deadline - now).total_seconds())
    completed = find_completed_updates(scheduled, deadline)
    newest = newest_h4_candle(settings)
    # The runbook's check: MAX(timestamp) FROM ohlcv_h4 "shows today's candles", i.e. the H4 candle
    # that closed at the start of the scheduled day is stored.
    day_start = scheduled.replace(hour=0, minute=0, second=0, microsecond=0)
    h4_ms = parse_timeframe("4h").ms
    store_current = newest is not None and newest + h4_ms >= int(day_start.timestamp() * 1000)
    newest_iso = datetime.fromtimestamp(newest / 1000, UTC).isoformat() if newest is not None else None
    result = {
        "scheduled_for": scheduled.isoformat(),
        "deadline": deadline.isoformat(),
        "completed_runs": completed,
        "newest_h4_open": newest_iso,
        "store_current": store_current,
    }
    if completed and store_current:
        logger.info("data-update completed in time: %s", ", ".join(r["name"] for r in completed))
        return result
    problems = []
    if not completed:
        problems.append(f"no data-update run completed between {scheduled:%Y-%m-%d %H:%M} and {deadline:%H:%M} UTC")
    if not store_current:
        problems.append(f"the newest H4 candle in the store opened at {newest_iso or 'never'}, not today's")
    emit(STORE_UPDATE_LATE, STORE_RESOURCE, {**result, "problems": problems})
    raise DataUpdateLate(
        "data-update is late: " + "; ".join(problems),
        hint="look at the data-update run in the Prefect UI (or its absence: is the worker up?), "
        "then run the deployment data-update/daily by hand",
    )


# --- data-validation ---


@task(name="check-data-quality", retries=1, retry_delay_seconds=10, timeout_seconds=600)
def check_data_quality(settings: dict[str, Any] | None, now_ms: int | None = None) -> DataQualityReport:
    """The staleness, coverage and continuity checks over the stored candles."""
    cfg = run_settings(settings)
    with open_store(cfg) as store:
        return check_data(store, cfg, now_ms=now_ms)


def _quality_table(report: DataQualityReport) -> list[dict[str, Any]]:
    rows = []
    for symbol in report.symbols:
        row: dict[str, Any] = {"symbol": symbol, "ok": True}
        reasons: list[str] = []
        for series in report.series_of(symbol):
            label = timeframe_label(series.timeframe)
            row[f"{label} age h"] = None if series.age_hours is None else round(series.age_hours, 2)
            row[f"{label} gaps"] = len(series.gaps)
            row["ok"] = row["ok"] and series.ok
            reasons.extend(series.reasons)
        row["reasons"] = "; ".join(reasons)
        rows.append(row)
    return rows


def stale_event_payload(report: DataQualityReport) -> dict[str, Any]:
    """What the data-staleness recovery needs: failing symbols, timeframes and windows, and why."""
    windows = report.failing_windows()
    return {
        "checks": dict(report.checks),
        "reasons": list(report.reasons[:20]),
        "coverage": round(report.coverage, 6),
        "failing_symbols": report.failing_symbols,
        "failing_timeframes": sorted({s.timeframe for s in report.series if not s.ok}),
        "failing_windows": [
            {"symbol": s, "timeframe": tf, "start_ms": a, "end_ms": b} for s, tf, a, b in windows[:MAX_EVENT_WINDOWS]
        ],
        "windows_total": len(windows),
        "checked_at_ms": report.checked_at_ms,
    }


@flow(
    name="data-validation",
    description="Staleness (H4 < 24 h, H1 < 6 h), coverage (>= 95 %) and continuity (no gap > 2 candles).",
    timeout_seconds=30 * 60,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def data_validation(settings: dict[str, Any] | None = None, now_ms: int | None = None) -> dict[str, Any]:
    """Check the store; on a failure emit crypto-agent.store.stale with the failing windows and fail."""
    report = check_data_quality(settings, now_ms)
    create_table_artifact(
        table=_quality_table(report), key="data-validation",
        description="; ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report.checks.items()),
    )
    if report.ok:
        emit(STORE_OK, STORE_RESOURCE, {"check": "data-validation", "coverage": round(report.coverage, 6)})
        return report.to_dict()
    emit(STORE_STALE, STORE_RESOURCE, stale_event_payload(report))
    raise DataQualityFailed(
        "data validation failed: " + "; ".join(report.reasons[:10]),
        hint="the data-staleness recovery backfills the failing windows; or run data-update by hand",
    )


# --- sentiment-macro-update ---


def fred_api_key(secret_block: str) -> str | None:
    """The FRED key from the Secret block `secret_block`, or None when that block does not exist."""
    try:
        return str(load_block(Secret, secret_block).get())
    except ValueError:  # no such block document: the settings (environment) may still have a key
        return None


@task(
    name="update-sentiment-macro",
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_jitter_factor=0.2,
    retry_condition_fn=retry_if_transient,
    timeout_seconds=900,
)
def update_sentiment_and_macro(settings: dict[str, Any] | None, secret_block: str) -> SentimentMacroSummary:
    """Fear & Greed into sentimento_mercado, FRED series into macro_series (skipped without a key)."""
    cfg = run_settings(settings)
    with open_store(cfg) as store:
        return update_sentiment_macro(store, cfg, fred_api_key=fred_api_key(secret_block))


@flow(
    name="sentiment-macro-update",
    description="The Crypto Fear & Greed index and FRED macro series, idempotent (runbook: 02:00 UTC).",
    timeout_seconds=3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def sentiment_macro_update(
    settings: dict[str, Any] | None = None, fred_secret_block: str = FRED_SECRET
) -> dict[str, Any]:
    """Update sentiment and macro data; without a FRED key the macro part is skipped with a warning."""
    logger = get_run_logger()
    summary = update_sentiment_and_macro(settings, fred_secret_block)
    for warning in summary.warnings:
        logger.warning(warning)
    create_markdown_artifact(
        markdown="## Sentiment and macro update\n\n" + "\n".join(f"- {line}" for line in summary.message.splitlines()),
        key="sentiment-macro-update",
        description="What the sentiment/macro update wrote and skipped",
    )
    return {
        "fear_greed_rows": summary.fear_greed_rows,
        "fred_rows": dict(summary.fred_rows),
        "fred_skipped": summary.fred_skipped,
        "warnings": list(summary.warnings),
    }
