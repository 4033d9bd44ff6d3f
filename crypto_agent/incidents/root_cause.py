"""The root cause of each scenario, in the runbook's words (`<box>: <detail>`, see ROOT_CAUSES).

Read from what the recovery found: the service's log lines, the probe's reasons, the exchange's
answer, integrity_check's problems. Pure functions: the flows record what these return.
"""

from __future__ import annotations

from collections.abc import Sequence

from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import IPBanned, RateLimited

MAX_DETAIL = 200  # characters of a log line kept in a root cause


def last_error(log_error_lines: Sequence[str]) -> str | None:
    """The newest ERROR or CRITICAL record among the log's error lines, None when there is none."""
    return next((e for e in reversed(log_error_lines) if " CRITICAL " in e or " ERROR " in e), None)


def crash_root_cause(service: str, log_error_lines: Sequence[str]) -> str:
    """Scenario 1: the service crashed with the last error it logged, or died without one (killed from outside)."""
    error = last_error(log_error_lines)
    if error is not None:
        return f"Other: {service} crashed ({error.split(': ', 1)[-1][:MAX_DETAIL]})"
    return (f"Other: {service} died without logging an error (killed from outside: SIGKILL, the OOM killer, "
            "a reboot)")


def exchange_root_cause(error: CryptoAgentError) -> str:
    """Scenario 2, the exchange cannot be used: an API throttle (HTTP 429, a 418 ban) or the exchange unreachable."""
    if isinstance(error, (RateLimited, IPBanned)):
        return "API throttle: " + error.message
    return "Other: exchange unreachable: " + error.message


def stale_root_cause(used_share: float | None, safety_margin: float, failing_symbols: Sequence[str]) -> str:
    """Scenario 2, the exchange answers: throttled (used weight at or over the safety margin), else candles missing."""
    if used_share is not None and used_share >= safety_margin:
        return f"API throttle: used weight at {used_share:.0%}"
    return "Other: candles missing or late (" + (", ".join(list(failing_symbols)[:10]) or "none") + ")"


def corruption_root_cause(problems: Sequence[str]) -> str:
    """Scenario 3: the first problems integrity_check listed."""
    return f"DB corruption: {'; '.join(list(problems)[:3])}"


def hang_root_cause(probe_reasons: Sequence[str], event_name: str | None, probe_summary: str) -> str:
    """Scenario 4: what the probe found wrong, else the event that reported it (a judgement over minutes)."""
    cause = "; ".join(probe_reasons) or f"{event_name} ({probe_summary} when looked at)"
    return f"Process hang: {cause}"
