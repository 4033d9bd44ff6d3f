"""The settings: the runbook's numbers as defaults, overridden by a TOML file, the environment, arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crypto_agent.errors import ConfigError
from crypto_agent.settings import CONFIG_ENV, config_file, load_settings
from crypto_agent.universe import UNIVERSE

CLI = Path(sys.executable).with_name("crypto-agent")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CRYPTO_AGENT_* from the caller's environment, no crypto-agent.toml from the working folder."""
    for key in list(os.environ):
        if key.startswith("CRYPTO_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, body: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


class TestDefaults:
    def test_defaults_are_the_runbook_numbers(self) -> None:
        s = load_settings()
        # data quality: H4 < 24 h, H1 < 6 h, >= 95 % of 60 symbols, no gap > 2 candles
        assert (s.stale_h4_hours, s.stale_h1_hours) == (24.0, 6.0)
        assert (s.stale_limit_hours("4h"), s.stale_limit_hours("1h")) == (24.0, 6.0)
        assert s.coverage_min == 0.95
        assert s.max_gap_candles == 2
        assert s.symbols == list(UNIVERSE) and len(s.symbols) == 60
        assert s.timeframes == ["1h", "4h"]
        # daemon health: heartbeat < 120 s, CPU < 90 %, RSS < 500 MB, log errors <= 5/min, spike 10 min
        assert (s.heartbeat_max_age_s, s.cpu_max_pct, s.rss_max_mb) == (120.0, 90.0, 500.0)
        assert (s.log_errors_per_min_max, s.cpu_spike_minutes) == (5, 10.0)
        # backtest window 23:30-01:30 UTC: main 60 % + backtest 30 % = 90 %, memory < 1.5 GB
        assert (s.window_start, s.window_end) == ("23:30", "01:30")
        assert (s.window_cpu_main_pct, s.window_cpu_backtest_pct, s.window_cpu_total_pct) == (60.0, 30.0, 90.0)
        assert s.window_memory_max_gb == 1.5
        # 3 crashes in 24 h -> rollback 48 h; storage < 1.2 GB
        assert (s.persistent_failures, s.persistent_window_hours, s.rollback_hours) == (3, 24.0, 48.0)
        assert s.storage_max_gb == 1.2
        # a crash loop backs off 10 s doubling to 5 min, reset after 10 min healthy
        assert (s.restart_backoff_base_s, s.restart_backoff_cap_s, s.restart_backoff_reset_s) == (10.0, 300.0, 600.0)

    def test_the_deprecated_crash_grace_sets_the_backoff_cap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert load_settings(crash_restart_grace_s=2).restart_backoff_cap_s == 2.0
        assert load_settings(crash_restart_grace_s=2, restart_backoff_cap_s=30).restart_backoff_cap_s == 30.0
        monkeypatch.setenv("CRYPTO_AGENT_CRASH_RESTART_GRACE_S", "0")
        s = load_settings()
        assert (s.crash_restart_grace_s, s.restart_backoff_cap_s) == (0.0, 0.0)
        assert load_settings(**s.model_dump()).restart_backoff_cap_s == 0.0  # a dump passed on keeps it

    def test_bounded_growth_defaults_are_the_retention_module_defaults(self) -> None:
        # issue 10: retention, free disk and the age of the newest good backup
        from crypto_agent import retention

        s = load_settings()
        assert s.retention_keep_runs == retention.KEEP_RUNS == 30
        assert (s.retention_probe_sample_days, s.retention_service_event_days) == (
            retention.PROBE_SAMPLE_DAYS, retention.SERVICE_EVENT_DAYS)
        assert (s.retention_flow_run_days, s.retention_failed_flow_run_days) == (
            retention.FLOW_RUN_DAYS, retention.FAILED_FLOW_RUN_DAYS) == (14.0, 30.0)
        assert s.disk_free_min_gb == retention.MIN_FREE_GB == 1.0
        assert s.backup_max_age_hours == 26.0
        with pytest.raises(ConfigError, match="retention_keep_runs"):
            load_settings(retention_keep_runs=0)
        with pytest.raises(ConfigError, match="retention_probe_sample_days"):
            load_settings(retention_probe_sample_days=0.5)

    def test_paths_are_resolved_against_home(self, tmp_path: Path) -> None:
        s = load_settings(home=tmp_path)
        assert s.db_path == tmp_path / "db" / "crypto_agent.db"
        assert s.database_url == f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}"
        assert (s.run_dir, s.logs_dir, s.backup_dir) == (tmp_path / "run", tmp_path / "logs", tmp_path / "backups")

    def test_no_config_file_by_default(self) -> None:
        assert config_file() is None


class TestEnvironment:
    def test_a_number_is_overridden(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CRYPTO_AGENT_STALE_H4_HOURS", "12.5")
        monkeypatch.setenv("CRYPTO_AGENT_MAX_GAP_CANDLES", "0")
        s = load_settings()
        assert s.stale_h4_hours == 12.5 and s.stale_limit_hours("4h") == 12.5
        assert s.max_gap_candles == 0

    def test_symbols_and_timeframes_from_comma_lists(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CRYPTO_AGENT_SYMBOLS", "btcusdt, ETHUSDT,BTCUSDT")
        monkeypatch.setenv("CRYPTO_AGENT_TIMEFRAMES", "4h")
        s = load_settings()
        assert s.symbols == ["BTCUSDT", "ETHUSDT"]
        assert s.timeframes == ["4h"]

    def test_home_and_db_path(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path / "agent"))
        monkeypatch.setenv("CRYPTO_AGENT_DB_PATH", str(tmp_path / "elsewhere.db"))
        s = load_settings()
        assert s.db_path == tmp_path / "elsewhere.db"
        assert s.run_dir == tmp_path / "agent" / "run"

    def test_arguments_beat_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CRYPTO_AGENT_COVERAGE_MIN", "0.8")
        assert load_settings(coverage_min=0.9).coverage_min == 0.9


class TestConfigFile:
    def test_values_from_the_file_named_by_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        path = write_config(tmp_path, 'stale_h1_hours = 3\ncoverage_min = 0.9\nsymbols = ["BTCUSDT", "SOLUSDT"]\n')
        monkeypatch.setenv(CONFIG_ENV, str(path))
        s = load_settings()
        assert config_file() == path
        assert (s.stale_h1_hours, s.coverage_min, s.symbols) == (3.0, 0.9, ["BTCUSDT", "SOLUSDT"])
        assert s.stale_h4_hours == 24.0  # untouched fields keep the defaults

    def test_the_environment_beats_the_file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, "stale_h1_hours = 3\n")))
        monkeypatch.setenv("CRYPTO_AGENT_STALE_H1_HOURS", "4")
        assert load_settings().stale_h1_hours == 4.0

    def test_crypto_agent_toml_in_the_working_folder_is_used(self, tmp_path: Path) -> None:
        write_config(tmp_path, "max_gap_candles = 5\n", name="crypto-agent.toml")
        assert load_settings().max_gap_candles == 5

    def test_a_missing_config_file_is_an_error(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
        with pytest.raises(ConfigError, match=r"absent\.toml") as info:
            load_settings()
        assert info.value.exit_code == 2 and CONFIG_ENV in info.value.hint


class TestMalformed:
    @pytest.mark.parametrize(
        ("var", "value", "field"),
        [
            ("CRYPTO_AGENT_COVERAGE_MIN", "lots", "coverage_min"),
            ("CRYPTO_AGENT_COVERAGE_MIN", "1.5", "coverage_min"),
            ("CRYPTO_AGENT_STALE_H4_HOURS", "-1", "stale_h4_hours"),
            ("CRYPTO_AGENT_MAX_GAP_CANDLES", "2.5", "max_gap_candles"),
            ("CRYPTO_AGENT_SYMBOLS", "BTC-USDT", "symbols"),
            ("CRYPTO_AGENT_TIMEFRAMES", "1h,15m", "timeframes"),
            ("CRYPTO_AGENT_WINDOW_START", "25:00", "window_start"),
            ("CRYPTO_AGENT_EXCHANGE_URL", "ftp://example", "exchange_url"),
        ],
    )
    def test_a_bad_environment_value_names_its_field(
        self, monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str
    ) -> None:
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError, match="malformed configuration") as info:
            load_settings()
        assert field in info.value.message
        assert info.value.exit_code == 2

    def test_a_bad_file_value_names_its_field(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, 'rss_max_mb = "big"\n')))
        with pytest.raises(ConfigError, match="rss_max_mb"):
            load_settings()

    def test_an_unknown_key_in_the_file_is_named(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, "stale_h4_hour = 12\n")))
        with pytest.raises(ConfigError, match="stale_h4_hour"):
            load_settings()

    def test_a_toml_syntax_error_is_a_config_error(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv(CONFIG_ENV, str(write_config(tmp_path, "stale_h4_hours = = 3\n")))
        with pytest.raises(ConfigError, match="malformed configuration"):
            load_settings()


def run_config(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    base.update({"CRYPTO_AGENT_HOME": str(tmp_path), **env})
    return subprocess.run([str(CLI), "config", *args], cwd=tmp_path, env=base,
                          capture_output=True, text=True, timeout=60, check=False)


class TestConfigCommand:
    def test_effective_values_as_json(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, "stale_h1_hours = 3\n")
        r = run_config(tmp_path, {CONFIG_ENV: str(path), "CRYPTO_AGENT_COVERAGE_MIN": "0.9"}, "--json")
        assert r.returncode == 0, r.stderr
        values = json.loads(r.stdout)
        assert (values["stale_h1_hours"], values["coverage_min"], values["stale_h4_hours"]) == (3.0, 0.9, 24.0)

    def test_a_malformed_value_exits_2_naming_the_field(self, tmp_path: Path) -> None:
        r = run_config(tmp_path, {"CRYPTO_AGENT_STALE_H1_HOURS": "soon"})
        assert r.returncode == 2
        assert r.stderr.startswith("error: malformed configuration")
        assert "stale_h1_hours" in r.stderr and "what to do:" in r.stderr
        assert r.stdout == ""

    def test_a_missing_config_file_exits_2_naming_it(self, tmp_path: Path) -> None:
        r = run_config(tmp_path, {CONFIG_ENV: str(tmp_path / "nope.toml")})
        assert r.returncode == 2
        assert "nope.toml" in r.stderr and "does not exist" in r.stderr
