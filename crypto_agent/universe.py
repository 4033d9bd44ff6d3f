"""The symbol universe and the timeframes the runbook trades: names, validation, candle lengths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from crypto_agent.errors import InputError

# The 60 USDT spot pairs of the runbook's universe.
UNIVERSE: tuple[str, ...] = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "DOTUSDT", "TRXUSDT", "LINKUSDT", "POLUSDT", "LTCUSDT", "BCHUSDT", "ATOMUSDT", "UNIUSDT",
    "XLMUSDT", "ETCUSDT", "FILUSDT", "APTUSDT", "NEARUSDT", "ARBUSDT", "OPUSDT", "ICPUSDT",
    "HBARUSDT", "VETUSDT", "ALGOUSDT", "AAVEUSDT", "GRTUSDT", "SANDUSDT", "MANAUSDT", "AXSUSDT",
    "EGLDUSDT", "THETAUSDT", "XTZUSDT", "EOSUSDT", "INJUSDT", "FLOWUSDT", "CHZUSDT", "KAVAUSDT",
    "RUNEUSDT", "CRVUSDT", "SNXUSDT", "COMPUSDT", "SUIUSDT", "ZECUSDT", "DASHUSDT", "NEOUSDT",
    "IOTAUSDT", "ENJUSDT", "BATUSDT", "ZILUSDT", "1INCHUSDT", "SUSHIUSDT", "YFIUSDT", "QTUMUSDT",
    "ONEUSDT", "SEIUSDT", "KSMUSDT", "TIAUSDT",
)

SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,20}$")


@dataclass(frozen=True)
class Timeframe:
    """A candle length as Binance names it, and the table that stores it."""

    interval: str  # Binance's name: "1h", "4h"
    table: str
    ms: int


TIMEFRAMES: dict[str, Timeframe] = {
    "1h": Timeframe("1h", "ohlcv_h1", 3_600_000),
    "4h": Timeframe("4h", "ohlcv_h4", 4 * 3_600_000),
}
# Aliases an operator may type: H1, h4, 1H ...
_ALIASES = {"h1": "1h", "h4": "4h", "1h": "1h", "4h": "4h"}


def timeframe(name: str) -> Timeframe:
    """The Timeframe for a name such as '1h', 'H4'; InputError for anything else."""
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise InputError(
            f"unknown timeframe {name!r}",
            hint=f"use one of: {', '.join(TIMEFRAMES)} (or H1, H4)",
        )
    return TIMEFRAMES[key]


def validate_symbol(symbol: str, universe: tuple[str, ...] | list[str] | None = None) -> str:
    """The symbol in canonical form; InputError when malformed or (given a universe) not in it."""
    s = symbol.strip().upper()
    if not SYMBOL_RE.match(s):
        raise InputError(
            f"malformed symbol {symbol!r}",
            hint="symbols are Binance spot pairs such as BTCUSDT: 2-20 letters and digits",
        )
    if universe is not None and s not in universe:
        raise InputError(
            f"unknown symbol {s!r}: not in the configured universe of {len(universe)} symbols",
            hint="check the spelling, or add it to `symbols` in the config file",
        )
    return s


def parse_symbols(text: str, universe: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """A comma-separated list of symbols, validated, deduplicated, in the order given."""
    out: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        s = validate_symbol(part, universe)
        if s not in out:
            out.append(s)
    if not out:
        raise InputError("no symbols given", hint="pass e.g. --symbols=BTCUSDT,ETHUSDT")
    return out
