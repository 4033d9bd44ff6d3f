"""Every table of the store, on one MetaData, so one create_all() makes the whole schema.

Each issue adds its tables in a section of its own below; nothing here does I/O.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table

from crypto_agent.universe import TIMEFRAMES

metadata = MetaData()

CANDLE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "trades",
)


def _ohlcv_table(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("symbol", String(20), primary_key=True),
        # candle open time, UTC epoch milliseconds as Binance gives it
        Column("timestamp", BigInteger, primary_key=True),
        Column("open", Float, nullable=False),
        Column("high", Float, nullable=False),
        Column("low", Float, nullable=False),
        Column("close", Float, nullable=False),
        Column("volume", Float, nullable=False),
        Column("close_time", BigInteger, nullable=False),
        Column("quote_volume", Float, nullable=False),
        Column("trades", Integer, nullable=False),
        sqlite_with_rowid=False,
    )


# --- market data (issue 2) ---
OHLCV_TABLES: dict[str, Table] = {tf.interval: _ohlcv_table(tf.table) for tf in TIMEFRAMES.values()}


# --- backtest results (issue 3) ---
from sqlalchemy import Index, Text  # noqa: E402  (kept in this section so sections stay independent)

backtest_results = Table(
    "backtest_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("params", Text, nullable=False),  # JSON object, keys sorted
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    # open times (UTC ms) of the first and the last candle the backtest used
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("candles", Integer, nullable=False),
    Column("fee_bps", Float, nullable=False),
    Column("total_return", Float, nullable=False),
    Column("sharpe", Float),  # NULL when undefined (flat returns)
    Column("max_drawdown", Float, nullable=False),  # <= 0: the worst fall from a peak, as a fraction
    Column("win_rate", Float),  # NULL when no trade was closed
    Column("trades", Integer, nullable=False),
    Column("exposure", Float, nullable=False),
    Column("created_at", BigInteger, nullable=False),  # UTC ms
    Index("ix_backtest_results_run_id", "run_id"),
    Index("ix_backtest_results_symbol_tf", "symbol", "timeframe", "strategy"),
    sqlite_autoincrement=True,
)


# --- services: paper trading, health probe, service events (issue 3) ---
from sqlalchemy import Boolean  # noqa: E402  (kept in this section so sections stay independent)
from sqlalchemy import text as _sql_text  # noqa: E402

# One row per symbol, strategy and closed candle the paper trader evaluated (never an order).
paper_signals = Table(
    "paper_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("candle_time", BigInteger, nullable=False),  # open time (UTC ms) of the newest closed candle
    Column("close", Float, nullable=False),
    Column("signal", Integer, nullable=False),  # 1 long, 0 flat
    Column("action", String(8), nullable=False),  # open, close, hold, flat
    Column("evaluated_at", BigInteger, nullable=False),  # UTC ms
    Index("ux_paper_signals_candle", "symbol", "timeframe", "strategy", "candle_time", unique=True),
)

paper_positions = Table(
    "paper_positions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("status", String(8), nullable=False),  # open, closed
    Column("quantity", Float, nullable=False),
    Column("entry_time", BigInteger, nullable=False),  # candle open time (UTC ms) of the entry signal
    Column("entry_price", Float, nullable=False),
    Column("exit_time", BigInteger),
    Column("exit_price", Float),
    Column("pnl_usdt", Float),
    Column("opened_at", BigInteger, nullable=False),  # UTC ms, wall clock
    Column("closed_at", BigInteger),
    # at most one open paper position per symbol, timeframe and strategy
    Index(
        "ux_paper_positions_open", "symbol", "timeframe", "strategy",
        unique=True, sqlite_where=_sql_text("status = 'open'"),
    ),
)

probe_samples = Table(
    "probe_samples",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(20), nullable=False),
    Column("checked_at", BigInteger, nullable=False),  # UTC ms
    Column("status", String(10), nullable=False),  # HEALTHY, DEGRADED, DEAD
    Column("pid", Integer),
    Column("alive", Boolean, nullable=False),
    Column("zombie", Boolean, nullable=False),
    Column("heartbeat_age_s", Float),
    Column("cpu_pct", Float),
    Column("rss_mb", Float),
    Column("log_errors_per_min", Float),
    Column("reasons", Text, nullable=False),  # "; "-joined, empty when healthy
    Index("ix_probe_samples_service_time", "service", "checked_at"),
)

# started / stopped (by the service), killed / start-failed (process control), crashed (whoever
# first sees a process gone without a clean stop); one row per kind and process instance.
service_events = Table(
    "service_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(20), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("at", BigInteger, nullable=False),  # UTC ms
    Column("pid", Integer),
    Column("instance", String(64), nullable=False),  # "<pid>@<create time>", so a crash counts once
    Column("source", String(20), nullable=False),  # service, process-control, probe
    Column("detail", Text, nullable=False),
    Index("ux_service_events_instance", "service", "kind", "instance", unique=True),
    Index("ix_service_events_time", "service", "kind", "at"),
)


# --- sentiment and macro (issue 4) ---

# The Crypto Fear & Greed index, one row per day.
sentimento_mercado = Table(
    "sentimento_mercado",
    metadata,
    Column("timestamp", BigInteger, primary_key=True, autoincrement=False),  # UTC ms of the day's start
    Column("date", String(10), nullable=False),  # YYYY-MM-DD (UTC), for people and SQL
    Column("value", Integer, nullable=False),  # 0 (extreme fear) .. 100 (extreme greed)
    Column("classification", String(32), nullable=False),  # "Extreme Fear" .. "Extreme Greed"
    Column("fetched_at", BigInteger, nullable=False),  # UTC ms
)

# FRED observations, one row per series and date; value is NULL where FRED says "." (no value).
macro_series = Table(
    "macro_series",
    metadata,
    Column("series_id", String(40), primary_key=True),
    Column("date", String(10), primary_key=True),  # YYYY-MM-DD as FRED gives it
    Column("timestamp", BigInteger, nullable=False),  # UTC ms of that date's start, like the other tables
    Column("value", Float),
    Column("fetched_at", BigInteger, nullable=False),  # UTC ms
)


# --- incidents (issue 5) ---

# On a MetaData of its own, created in its own file (settings.incidents_db_path): the incident log
# must survive the restore or rollback of the store that an incident may cause.
incidents_metadata = MetaData()

incidents = Table(
    "incidents",
    incidents_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scenario", String(32), nullable=False),  # daemon-crash, stale-data, db-corruption, process-hang, ...
    Column("resource", String(120), nullable=False),  # the Prefect resource id, e.g. crypto-agent.store.main
    # Recoveries of one family on one resource run one at a time (crash and hang share "service").
    Column("family", String(16), nullable=False),
    Column("status", String(10), nullable=False),  # open, resolved, failed, escalated
    Column("outcome", String(12)),  # recovered, escalated, failed, skipped (set on closing)
    Column("trigger", Text, nullable=False),  # JSON: the triggering event's id, name, resource, payload
    Column("detected_at", BigInteger, nullable=False),  # UTC ms
    Column("fault_at", BigInteger),  # UTC ms, when known (e.g. the last heartbeat of a dead service)
    Column("opened_at", BigInteger, nullable=False),
    Column("resolved_at", BigInteger),
    Column("detection_delay_s", Float),
    Column("recovery_time_s", Float),  # from detection to verified recovery (or to giving up)
    Column("data_lost_hours", Float),
    Column("actions", Text, nullable=False),  # JSON list of {at, step, ok, detail}
    Column("impact", Text, nullable=False),
    Column("root_cause", Text, nullable=False),
    Column("summary", Text, nullable=False),
    Column("levels_told", Text, nullable=False),  # JSON list of "l1" / "l2" / "l3"
    Column("events_absorbed", Integer, nullable=False),
    Column("flow_run_id", String(64)),
    Column("owner", String(200), nullable=False),  # host:pid:create time of the process running the recovery
    Column("report_md", Text),
    # A person is needed (issue 10): set when a recovery closes it escalated or failed, cleared when a later
    # recovery resolves it or a person does; the same signal detected again rejoins it (no new incident).
    # Added to an existing file by crypto_agent.incidents.log (ALTER TABLE when missing).
    Column("needs_person", Integer, nullable=False, server_default=_sql_text("0")),
    Column("needs_person_since", BigInteger),  # UTC ms of the first close that needed a person
    Column("last_paged_at", BigInteger),  # UTC ms of the last message about it that was delivered
    Column("detections", Integer, nullable=False, server_default=_sql_text("0")),  # runs that rejoined it
    Column("rejoined_at", BigInteger),  # UTC ms of the last rejoin: from then on it is abandoned like a new one
    # Paging as on-call tools do it (issue 11): the climb of unacknowledged pages, MTTA, the report's last fields.
    Column("first_paged_at", BigInteger),  # UTC ms of the first delivered page (MTTA counts from it)
    Column("paged_level", String(4)),  # the highest level paged: l1, l2, l3
    Column("paged_level_at", BigInteger),  # when it was reached: the ack timeout counts from it
    Column("acked_at", BigInteger),  # UTC ms of the acknowledgement (`crypto-agent ack ID`)
    Column("acked_by", String(120)),
    Column("report_owner", String(120)),  # the report's "Assigned to" (`crypto-agent incidents close-report`)
    Column("report_due", String(10)),  # YYYY-MM-DD
    Column("report_prevention", Text),  # JSON list of the runbook's prevention items ticked, "Other: ..." for text
    Column("report_published_at", BigInteger),  # UTC ms the artifact incident-<id> last showed report_md
    Column("report_updated_at", BigInteger),  # UTC ms report_md last changed outside a flow (republish when newer)
    Index("ux_incidents_open", "resource", "family", unique=True, sqlite_where=_sql_text("status = 'open'")),
    Index("ix_incidents_scenario_time", "scenario", "opened_at"),
)


# --- monitoring (issue 5) ---

# Service events (crashes) the monitoring side has reported as Prefect events: claimed here first,
# so each crash becomes exactly one event for the persistent-failure threshold, whoever reports it.
reported_service_events = Table(
    "reported_service_events",
    metadata,
    Column("service", String(20), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("instance", String(64), primary_key=True),  # service_events.instance
    Column("reported_at", BigInteger, nullable=False),  # UTC ms
)


# --- silences (issue 11): pages for a resource held while maintenance goes on; recoveries still run ---

silences = Table(
    "silences",
    incidents_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pattern", String(200), nullable=False),  # a resource id, a glob of them, or a service/store name
    Column("reason", Text, nullable=False),
    Column("created_by", String(120), nullable=False),
    Column("starts_at", BigInteger, nullable=False),  # UTC ms
    Column("ends_at", BigInteger, nullable=False),  # UTC ms; an expired silence ends when it was expired
    Column("held", Text, nullable=False, server_default=_sql_text("'[]'")),  # JSON list of the pages held back
    Column("summarized_at", BigInteger),  # UTC ms the pages it held were told, after its end
)
