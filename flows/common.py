"""What several runbook flows share: their settings, and which failures a retry can fix."""

from __future__ import annotations

import re
from typing import Any

import httpx
from prefect.client.schemas.objects import State, TaskRun

from crypto_agent.errors import CryptoAgentError, StoreLocked
from crypto_agent.exchange import (
    ExchangeError,
    ExchangeUnreachable,
    InvalidSymbol,
    IPBanned,
    MalformedResponse,
    RateLimited,
)
from crypto_agent.sentiment import SentimentError
from crypto_agent.settings import Settings, load_settings

# How the exchange client words a refused request, e.g. "the exchange answered HTTP 400 to ...".
_HTTP_STATUS_RE = re.compile(r"answered HTTP (\d{3})")


def run_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """The settings a flow run works with: defaults, config file, environment, then these overrides."""
    return load_settings(**(overrides or {}))


class UpdateIncomplete(CryptoAgentError):
    """Some symbols of a collect run failed; `retryable` when a retry may fix at least one of them."""

    def __init__(self, failures: dict[str, str], retryable: bool, written: int) -> None:
        self.failures = dict(failures)
        self.retryable = retryable
        shown = "; ".join(f"{s}: {m}" for s, m in list(failures.items())[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(
            f"{len(failures)} symbol(s) failed ({shown}{more}); {written} candles were written for the others",
            hint="a retry fetches only what is still missing"
            if retryable
            else "fix or remove the symbols named (`symbols` in the config file); a retry would fail the same way",
        )


def symbol_failure_is_transient(symbol: str, message: str) -> bool:
    """Whether a symbol's failure recorded by the collector is worth a retry (a 5xx or a malformed body).

    The collector keeps a failure's message only, so the two lasting ones are recognised by the exact
    words the exchange client uses: an unknown symbol, and a 4xx other than 429.
    """
    if message == InvalidSymbol(symbol).message:
        return False
    status = _HTTP_STATUS_RE.search(message)
    if status is not None:
        code = int(status.group(1))
        return code >= 500 or code == 429
    return True


def is_transient(exc: BaseException | None) -> bool:
    """Whether a retry can fix this failure: timeouts, 5xx, 429, an unreachable service, a held lock.

    Never: a 418 ban (retrying extends it), an unknown symbol, a bad setting or argument, anything unknown.
    """
    if exc is None:
        return False
    if isinstance(exc, (IPBanned, InvalidSymbol)):
        return False
    if isinstance(exc, (RateLimited, ExchangeUnreachable, MalformedResponse, StoreLocked, TimeoutError)):
        return True
    if isinstance(exc, ExchangeError):
        return exc.status >= 500 or exc.status == 429
    if isinstance(exc, (UpdateIncomplete, SentimentError)):
        return exc.retryable
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, (httpx.TimeoutException, httpx.TransportError))


def failure_of(state: State) -> BaseException | None:
    """The exception a Failed state holds, if any."""
    data = state.data
    if isinstance(data, BaseException):
        return data
    try:
        # `_sync` is read by Prefect's async_dispatch wrapper, not part of result()'s overloads.
        result = state.result(raise_on_failure=False, _sync=True)  # type: ignore[call-overload]
    except Exception as exc:  # noqa: BLE001 (the result could not be read back: judge by what that says)
        return exc
    return result if isinstance(result, BaseException) else None


def retry_if_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """retry_condition_fn for tasks that call the exchange or an API: retry only transient failures."""
    return is_transient(failure_of(state))
