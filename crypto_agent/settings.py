"""One settings object for every number of the runbook, from defaults, a TOML file and the environment.

Precedence, highest first: keyword arguments, environment variables (``CRYPTO_AGENT_<FIELD>``),
the config file (``CRYPTO_AGENT_CONFIG``, else ``crypto-agent.toml`` in the working directory when
it exists), then the defaults below, which are the runbook's.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from crypto_agent.errors import ConfigError
from crypto_agent.universe import SYMBOL_RE, TIMEFRAMES, UNIVERSE

CONFIG_ENV = "CRYPTO_AGENT_CONFIG"
DEFAULT_CONFIG_FILE = "crypto-agent.toml"


class Settings(BaseSettings):
    """Everything the runbook fixes, with its values as defaults."""

    model_config = SettingsConfigDict(
        env_prefix="CRYPTO_AGENT_",
        extra="forbid",
        validate_default=True,
    )

    # --- paths (relative ones are resolved against `home`) ---
    home: Path = Field(Path("."), description="Folder that holds db/, run/, logs/ and backups/.")
    db_path: Path = Field(Path("db/crypto_agent.db"), description="The SQLite store.")
    database_url: str = Field("", description="SQLAlchemy URL; derived from db_path when unset.")
    run_dir: Path = Field(Path("run"), description="Pidfiles and heartbeats.")
    logs_dir: Path = Field(Path("logs"), description="Service logs and stack dumps.")
    backup_dir: Path = Field(Path("backups"), description="db_backup_YYYYMMDD.db and manifests.")
    quarantine_dir: Path = Field(Path("quarantine"), description="Corrupt databases, never overwritten.")

    # --- market data ---
    exchange_url: str = Field("http://127.0.0.1:8765", description="Binance-compatible REST base URL.")
    symbols: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(UNIVERSE), description="The universe.")
    timeframes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["1h", "4h"])
    initial_history_days: int = Field(30, ge=1, le=3650, description="History fetched for a symbol new to the store.")
    weight_limit_per_minute: int = Field(6000, gt=0, description="Binance's request-weight limit per minute.")
    weight_safety_margin: float = Field(0.9, gt=0, le=1, description="Slow down above this share of the limit.")
    weight_window_s: float = Field(
        60.0, gt=0, description="Length of the exchange's request-weight window (Binance: one minute)."
    )
    request_timeout_s: float = Field(10.0, gt=0)
    request_retries: int = Field(4, ge=0, le=20, description="Retries of a 5xx or a timeout.")
    retry_backoff_s: float = Field(0.5, ge=0, description="First backoff; doubles each retry.")
    max_retry_after_s: float = Field(120.0, gt=0, description="Longest Retry-After the client will wait.")

    # --- data quality (runbook: staleness, coverage, continuity) ---
    stale_h1_hours: float = Field(6.0, gt=0)
    stale_h4_hours: float = Field(24.0, gt=0)
    coverage_min: float = Field(0.95, gt=0, le=1)
    max_gap_candles: int = Field(2, ge=0, description="Longest tolerated run of missing candles.")
    continuity_window_hours: float = Field(72.0, gt=0, description="Window the continuity check looks at.")

    # --- service health ---
    heartbeat_max_age_s: float = Field(120.0, gt=0)
    cpu_max_pct: float = Field(90.0, gt=0)
    rss_max_mb: float = Field(500.0, gt=0)
    log_errors_per_min_max: int = Field(5, ge=0)
    cpu_spike_minutes: float = Field(10.0, gt=0)
    stop_grace_s: float = Field(10.0, gt=0, description="SIGTERM grace before SIGKILL.")
    hung_stop_grace_s: float = Field(
        2.0, gt=0,
        description="The SIGTERM grace of a service the hang recovery stops (instead of stop_grace_s): its main "
        "loop has been silent past the heartbeat limit already, so a longer wait rarely sees it finish its unit; "
        "SQLite rolls back what SIGKILL interrupts.",
    )

    # --- backtest window 23:30-01:30 UTC ---
    window_start: str = Field("23:30")
    window_end: str = Field("01:30")
    window_cpu_main_pct: float = Field(60.0, gt=0)
    window_cpu_backtest_pct: float = Field(30.0, gt=0)
    window_cpu_total_pct: float = Field(90.0, gt=0)
    window_memory_max_gb: float = Field(1.5, gt=0)

    # --- persistent failures, storage ---
    persistent_failures: int = Field(3, ge=1, description="Crashes within the window that trigger rollback.")
    persistent_window_hours: float = Field(24.0, gt=0)
    rollback_hours: float = Field(48.0, gt=0)
    storage_max_gb: float = Field(1.2, gt=0)

    # --- bounded growth: retention, free disk, the age of the newest backup (issue 10) ---
    retention_keep_runs: int = Field(
        30, ge=1, description="Backtest runs kept per strategy, symbol and timeframe by prune-history (newest first)."
    )
    retention_probe_sample_days: float = Field(
        7.0, ge=1, description="Days of health-probe samples (probe_samples) prune-history keeps."
    )
    retention_service_event_days: float = Field(
        30.0, ge=1, description="Days of service events kept (the newest of each kind of each service always stays)."
    )
    retention_flow_run_days: float = Field(
        14.0, ge=1,
        description="Days finished Prefect flow runs (completed, cancelled) are kept; prune-history deletes older.",
    )
    retention_failed_flow_run_days: float = Field(
        30.0, ge=1, description="Days failed and crashed Prefect flow runs are kept (post-incident reviews read them)."
    )
    disk_free_min_gb: float = Field(
        1.0, ge=0, description="Free disk under this (GB, beside the store) tells L2 and runs the retention."
    )
    backup_max_age_hours: float = Field(
        26.0, gt=0,
        description="A newest good backup older than this tells L2 and takes a backup (daily at 02:30 + slack).",
    )
    # --- every detection reaches someone (issue 10, crypto_agent/alerts.py) ---
    backtest_results_max_age_s: float = Field(
        7200.0, gt=0,
        description="Runbook 'backtest results stale > 2 h': a daemon running longer than this with no newer "
        "backtest_results row (and not paused on purpose) is triaged by recover-process-hang.",
    )
    job_late_after_s: float = Field(
        300.0, ge=0,
        description="Runbook 'alert if > 5 min late': a scheduled runbook job not started this long after its "
        "slot tells L1 (job-watch); the same job failing or late twice in a row tells L2.",
    )
    log_error_lines_max: int = Field(
        10, ge=1, le=200, description="Error lines of a service's log quoted to L1 when it logs over the limit."
    )

    # --- backups, sentiment and macro (issue 4) ---
    backup_keep_daily: int = Field(
        3, ge=2, description="Newest daily backups kept (3 always holds yesterday's and the 48 h one)."
    )
    backup_keep_weekly: int = Field(4, ge=0, description="Weeks for which the newest backup is kept.")
    backup_keep_monthly: int = Field(3, ge=0, description="Months for which the newest backup is kept.")
    backup_test_min_rows: int = Field(
        1000, ge=0, description="Rows of ohlcv_h4 yesterday's backup must hold to pass the restore test."
    )
    # --- continuous replication, off-host copies, restore drills (issue 12) ---
    replica_dir: Path = Field(
        Path("replica"), description="Litestream's file replica of the store (the embedded default); relative to home."
    )
    replica_enabled: bool = Field(
        True, description="Run Litestream beside the store (part of the stack, a systemd unit in production) and "
        "restore from its replica first.",
    )
    replica_sync_interval_s: float = Field(
        1.0, ge=0.1, le=3600, description="Litestream's sync interval: the floor of the replica's RPO."
    )
    replica_url: str = Field(
        "", description="An S3-compatible replica for Litestream instead of replica_dir, e.g. "
        "s3://bucket/crypto-agent (credentials from the environment: LITESTREAM_ACCESS_KEY_ID ...).",
    )
    replica_endpoint: str = Field("", description="The S3 endpoint of replica_url (empty: AWS itself).")
    offhost_block: str = Field(
        "", description="Name of a saved prefect-aws S3Bucket block the daily verified backup is uploaded to; "
        "empty: no off-host copy.",
    )
    offhost_prefix: str = Field("backups", description="The key prefix of the off-host copies in that bucket.")
    drill_dir: Path = Field(
        Path("staging"), description="The staging home of the restore drill (its own db/, run/, logs/); relative "
        "to home.",
    )
    fear_greed_url: str = Field(
        "http://127.0.0.1:8765/fng/", description="Crypto Fear & Greed API (alternative.me: https://api.alternative.me/fng/)."
    )
    fear_greed_limit: int = Field(30, ge=0, description="Days of the index fetched per update (0: all history).")
    fred_url: str = Field(
        "http://127.0.0.1:8765/fred", description="FRED API base URL (production: https://api.stlouisfed.org/fred)."
    )
    fred_series: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["DGS10", "DFF", "CPIAUCSL", "M2SL", "DTWEXBGS", "VIXCLS"],
        description="FRED series loaded into macro_series (comma-separated in the environment).",
    )
    fred_api_key: SecretStr | None = Field(
        None, description="FRED API key; without one the macro update is skipped with a warning."
    )

    # --- services: backtest daemon, paper trader, process control, probe (issue 3) ---
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a service's main loop writes its heartbeat while it waits."
    )
    daemon_unit_pause_s: float = Field(
        0.2, ge=0,
        description="Pause of the backtest daemon between two units of work (one symbol, timeframe, strategy).",
    )
    daemon_cycle_pause_s: float = Field(
        60.0, ge=0, description="Pause of the backtest daemon after a full pass over the universe and strategies."
    )
    daemon_lookback_days: int = Field(
        730, ge=0, description="History each daemon backtest uses (days); 0: everything stored."
    )
    daemon_niceness: int = Field(
        10, ge=0, le=19, description="Niceness the daemon gives itself, so live trading keeps priority."
    )
    trader_cycle_s: float = Field(60.0, gt=0, description="Seconds between two evaluations of the paper trader.")
    trader_strategy: str = Field("sma_cross", description="Strategy the paper trader evaluates (backtest.STRATEGIES).")
    trader_timeframe: str = Field("1h", description="Timeframe whose newest closed candles the paper trader reads.")
    trader_candles: int = Field(
        300, ge=2, le=100_000, description="Newest closed candles the paper trader reads per symbol and cycle."
    )
    trader_notional_usdt: float = Field(1000.0, gt=0, description="Size of one paper position in USDT.")
    probe_cpu_sample_s: float = Field(
        0.5, gt=0, le=60, description="How long the health probe samples a service's CPU use."
    )
    start_timeout_s: float = Field(
        30.0, gt=0, description="How long process control waits for a started service's pidfile and first heartbeat."
    )
    log_max_bytes: int = Field(10_000_000, ge=10_000, description="Size at which a service log is rotated.")
    log_backups: int = Field(5, ge=1, le=100, description="Rotated service logs kept (name.log.1 ... .N).")

    # --- monitoring: heartbeat relay, automations, window guard (issue 5) ---
    relay_poll_s: float = Field(
        1.0, gt=0, le=60, description="How often the heartbeat relay reads the services' heartbeat files."
    )
    relay_tick_s: float = Field(
        10.0, ge=1, le=600,
        description="How often the heartbeat relay emits its own tick; the dead man's switch pages L2 "
        "after dead_mans_switch_intervals ticks of silence.",
    )
    heartbeat_missing_s: float = Field(
        15.0, ge=10, le=3600,
        description="Silence after a service's last heartbeat event before the proactive automation runs "
        "the daemon-crash recovery (Prefect needs at least 10 s; keep it over heartbeat_interval_s).",
    )
    heartbeat_stale_fallback_s: float = Field(
        10.0, ge=0, le=3600,
        description="How long after the heartbeat limit the proactive heartbeat-stale automation runs the "
        "daemon-crash recovery: a fallback for a relay that is away (the relay itself emits service.hung at the "
        "limit, and a second flow run starting beside the hang recovery only slows it down).",
    )
    dead_mans_switch_intervals: int = Field(
        3, ge=2, le=100, description="Missed intervals of the monitor or the relay before L2 is paged."
    )
    monitor_switch_grace_s: float = Field(
        120.0, ge=10, le=3600,
        description="The health monitor's dead man's switch pages L2 after its cron interval plus this grace "
        "without a tick (issue 10: within 2 minutes of the round that did not come).",
    )
    flow_run_start: str = Field(
        "fork", pattern="^(fork|spawn)$",
        description="How the serving process starts a flow run: 'fork' from a process that has already imported "
        "Prefect and the flows (about 0.1 s), or 'spawn' a fresh interpreter as Prefect does (2.5-4 s of imports).",
    )
    serve_poll_s: float = Field(
        0.5, ge=0.1, le=60,
        description="How often the serving process asks the Prefect server for flow runs to start (and for runs "
        "to cancel): a triggered recovery waits half of it on average. PREFECT_RUNNER_POLL_FREQUENCY takes whole "
        "seconds only; this is handed to the runner directly.",
    )
    serve_tick_s: float = Field(
        30.0, ge=1, le=600,
        description="How often the serving process emits its own tick; its dead man's switch pages L2 after "
        "dead_mans_switch_intervals ticks of silence.",
    )
    store_corrupt_retry_s: float = Field(
        30.0, ge=1, le=3600,
        description="How long a service that met a corrupt store waits (heart-beating 'store corrupt') "
        "before it tries the store again.",
    )
    window_throttle_niceness: int = Field(
        19, ge=0, le=19, description="Niceness the backtest-window guard gives the backtest daemon on a breach."
    )

    # --- notifications (issue 4) ---
    receiver_url: str = Field(
        "http://127.0.0.1:8766",
        description="The local webhook receiver that stands in for Slack in the embedded default.",
    )
    receiver_log: Path = Field(
        Path("receiver.jsonl"), description="JSON-lines log of what the receiver got; relative to logs_dir."
    )

    # --- recovery and incidents (issue 5) ---
    crash_restart_grace_s: float = Field(
        300.0, ge=0,
        description="Deprecated: the cap of the restart backoff (restart_backoff_cap_s), which it sets when that "
        "is not set itself. It was a fixed hold after a start (runbook: don't restart yet if within 5 min).",
    )
    restart_backoff_base_s: float = Field(
        10.0, ge=0,
        description="recover-daemon-crash restarts a service's first crash at once; the 2nd crash of a loop waits "
        "this long, each further one twice as long (like systemd's StartLimit, Kubernetes' CrashLoopBackOff).",
    )
    restart_backoff_cap_s: float = Field(
        300.0, ge=0, le=3600,
        description="Longest hold of the restart backoff (runbook: don't restart yet if within 5 min).",
    )
    restart_backoff_reset_s: float = Field(
        600.0, gt=0,
        description="A service that ran this long after its start before it crashed starts a new crash loop: "
        "it is restarted at once again.",
    )
    incidents_db_path: Path = Field(
        Path("db/incidents.db"),
        description="The incident log, a SQLite file of its own so a restore or rollback of the store keeps it; "
        "relative to home.",
    )
    page_repeat_after_s: float = Field(
        14400.0, ge=0,
        description="A problem the recoveries could not fix is one 'needs a person' incident: the same signal "
        "detected again joins it, and it is re-paged at most this often (seconds) until it clears.",
    )

    page_group_window_s: float = Field(
        600.0, ge=0,
        description="A fault that comes back on the same resource less than this long (seconds) after its last "
        "incident was recovered joins it in one page: the new incident's opening page is held and its close says "
        "'again' (Alertmanager's group interval); 0 pages every incident's opening.",
    )
    # --- paging as on-call tools do it: acknowledgements, silences, the rollback's gate (issue 11) ---
    ack_timeout_s: float = Field(
        900.0, ge=10,
        description="A page that needs a person and is not acknowledged (`crypto-agent ack ID`) this long after it "
        "reached a level climbs to the next one (L1 -> L2 -> L3), as PagerDuty's escalation policies do.",
    )
    exchange_down_l3_after_s: float = Field(
        3600.0, ge=0,
        description="Data stale because the exchange cannot be used: L2 checks the Binance API at once, L3 is told "
        "to contact Binance once it has been unusable this long (at once for an HTTP 418 ban).",
    )
    rollback_approval_timeout_s: float = Field(
        1800.0, ge=0,
        description="How long the rollback (the runbook's last resort) waits in the Prefect UI for a person to "
        "approve or reject it before rollback_on_timeout applies.",
    )
    rollback_on_timeout: Literal["proceed", "wait"] = Field(
        "proceed",
        description="What a rollback nobody approved or rejected does after rollback_approval_timeout_s: 'proceed' "
        "(the runbook's automatic last resort) or 'wait' (stays paused, L3 paged).",
    )

    # --- the whole stack on this machine: `crypto-agent up` (issue 6) ---
    prefect_port: int = Field(
        4200, ge=1, le=65535, description="Port of the local Prefect server `crypto-agent up` starts on 127.0.0.1."
    )
    prefect_home: Path = Field(
        Path(".prefect"),
        description="PREFECT_HOME of the stack's Prefect server and flow runs (its SQLite database, results); "
        "relative to home, never the user's global profile.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in v.split(",") if p.strip()]
        return v

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            s = s.strip().upper()
            if not SYMBOL_RE.match(s):
                raise ValueError(f"malformed symbol {s!r}")
            if s not in out:
                out.append(s)
        if not out:
            raise ValueError("the universe is empty")
        return out

    @field_validator("fred_series", mode="before")
    @classmethod
    def _split_fred_series(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("fred_series")
    @classmethod
    def _check_fred_series(cls, v: list[str]) -> list[str]:
        for s in v:
            # FRED series ids are upper-case letters, digits and underscores (DGS10, CPIAUCSL)
            if not s or len(s) > 40 or not all(c.isascii() and (c.isalnum() or c == "_") for c in s):
                raise ValueError(f"malformed FRED series id {s!r}")
        return [s.upper() for s in v]

    @field_validator("fear_greed_url", "fred_url")
    @classmethod
    def _check_api_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @field_validator("timeframes", mode="before")
    @classmethod
    def _split_timeframes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("timeframes")
    @classmethod
    def _check_timeframes(cls, v: list[str]) -> list[str]:
        for tf in v:
            if tf not in TIMEFRAMES:
                raise ValueError(f"unknown timeframe {tf!r}; use {sorted(TIMEFRAMES)}")
        return v

    @field_validator("window_start", "window_end")
    @classmethod
    def _check_hhmm(cls, v: str) -> str:
        try:
            h, m = v.split(":")
            if not (0 <= int(h) < 24 and 0 <= int(m) < 60):
                raise ValueError
        except ValueError:
            raise ValueError(f"{v!r} is not a time of day HH:MM") from None
        return v

    @field_validator("exchange_url", "receiver_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        home = self.home.expanduser()
        for name in ("db_path", "run_dir", "logs_dir", "backup_dir", "quarantine_dir", "incidents_db_path",
                     "prefect_home", "replica_dir", "drill_dir"):
            p: Path = getattr(self, name).expanduser()
            if not p.is_absolute():
                object.__setattr__(self, name, home / p)
        receiver_log = self.receiver_log.expanduser()
        if not receiver_log.is_absolute():
            object.__setattr__(self, "receiver_log", self.logs_dir / receiver_log)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.db_path}")
        return self

    @model_validator(mode="after")
    def _deprecated_grace_is_the_cap(self) -> Settings:
        if "crash_restart_grace_s" in self.model_fields_set and "restart_backoff_cap_s" not in self.model_fields_set:
            object.__setattr__(self, "restart_backoff_cap_s", min(self.crash_restart_grace_s, 3600.0))
        return self

    def stale_limit_hours(self, timeframe: str) -> float:
        """The staleness limit of a timeframe ('1h' or '4h')."""
        return self.stale_h1_hours if timeframe == "1h" else self.stale_h4_hours


def config_file() -> Path | None:
    """The config file in use: $CRYPTO_AGENT_CONFIG (must exist), else ./crypto-agent.toml if present."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config file {path} (from ${CONFIG_ENV}) does not exist",
                hint=f"create it, or unset {CONFIG_ENV} to use the defaults",
            )
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Settings from defaults, config file and environment; ConfigError naming each bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(config)"
            problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(
            "malformed configuration: " + "; ".join(problems),
            hint="fix the value in the environment (CRYPTO_AGENT_<FIELD>) or in the config file",
        ) from None
    except ValueError as exc:  # a TOML syntax error, or a value a source could not parse
        raise ConfigError(
            f"malformed configuration: {exc}",
            hint="fix the TOML syntax of the config file, or the environment variable it names",
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded once."""
    return load_settings()
