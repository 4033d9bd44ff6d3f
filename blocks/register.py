"""Register the project's Block types and create the default Block documents (idempotent)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret

from blocks import load_block
from blocks.escalation import DEFAULT_ESCALATION, LEVELS, Escalation
from crypto_agent.settings import Settings, load_settings

FRED_SECRET = "fred-api-key"
FRED_KEY_ENV = "CRYPTO_AGENT_FRED_API_KEY"
BLOCK_TYPES: tuple[type[Block], ...] = (Escalation,)


@dataclass
class Registered:
    """What a registration created or replaced: block type slugs and block document names."""

    block_types: list[str] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def receiver_webhook(settings: Settings, level: str) -> CustomWebhookNotificationBlock:
    """A webhook block that posts a level's messages as JSON to the local receiver at <receiver_url>/<level>."""
    return CustomWebhookNotificationBlock(
        name=f"{DEFAULT_ESCALATION}-{level}",
        url=f"{settings.receiver_url}/{level}",
        json_data={"level": level, "subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
        timeout=10,
    )


def register_block_types() -> list[str]:
    """Register our Block types with the Prefect API; their slugs."""
    slugs = []
    for block_type in BLOCK_TYPES:
        # Synchronously (also from async code); Escalation then registers its tree once per process and API.
        block_type.register_type_and_schema(_sync=True)  # type: ignore[call-arg]  # async_dispatch takes it
        slugs.append(block_type.get_block_type_slug())
    return slugs


def register_defaults(settings: Settings | None = None, fred_api_key: str | None = None) -> Registered:
    """Create or replace the default documents: escalation "crypto-agent" on the local receiver, the FRED secret.

    The FRED key comes from `fred_api_key` or $CRYPTO_AGENT_FRED_API_KEY; without one no Secret is written.
    """
    settings = settings or load_settings()
    done = Registered(block_types=register_block_types())
    levels = {}
    for level in LEVELS:
        webhook = receiver_webhook(settings, level)
        name = f"{DEFAULT_ESCALATION}-{level}"
        webhook.save(name, overwrite=True)
        levels[level] = load_block(CustomWebhookNotificationBlock, name)
        done.documents.append(f"{CustomWebhookNotificationBlock.get_block_type_slug()}/{name}")
    war_room = receiver_webhook(settings, "war-room")  # the runbook's war room: a channel of its own, beside L3
    war_room.save(f"{DEFAULT_ESCALATION}-war-room", overwrite=True)
    Escalation(**levels, war_room=[load_block(CustomWebhookNotificationBlock, f"{DEFAULT_ESCALATION}-war-room")]
               ).save(DEFAULT_ESCALATION, overwrite=True)
    done.documents.append(f"{CustomWebhookNotificationBlock.get_block_type_slug()}/{DEFAULT_ESCALATION}-war-room")
    done.documents.append(f"{Escalation.get_block_type_slug()}/{DEFAULT_ESCALATION}")
    key = fred_api_key or os.environ.get(FRED_KEY_ENV)
    if key:
        Secret(value=key).save(FRED_SECRET, overwrite=True)
        done.documents.append(f"secret/{FRED_SECRET}")
    else:
        done.skipped.append(f"secret/{FRED_SECRET} (set {FRED_KEY_ENV} to store the FRED API key)")
    return done
