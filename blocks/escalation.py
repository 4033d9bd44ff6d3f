"""The runbook's escalation path as a Prefect Block: one notification block per level (L1, L2, L3)."""

from __future__ import annotations

import inspect
from typing import Literal

from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.client.schemas.objects import BlockDocument
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import Field, HttpUrl

from crypto_agent.errors import CryptoAgentError

Level = Literal["l1", "l2", "l3"]
LEVELS: tuple[Level, ...] = ("l1", "l2", "l3")
LEVEL_ROLES: dict[Level, str] = {"l1": "on-call", "l2": "DevOps", "l3": "lead"}
DEFAULT_ESCALATION = "crypto-agent"

# Prefect registers a block field's type, so it must name concrete block types, not the
# NotificationBlock interface: Slack in production, a custom webhook (the local receiver, or any
# other service) otherwise. Each member adds seconds to every save (pydantic schema generation).
NotificationChannel = SlackWebhook | CustomWebhookNotificationBlock


class NotificationUndelivered(CryptoAgentError):
    """A notification could not be delivered: the webhook URL is malformed, down, or said no."""


def level_name(level: str | int) -> Level:
    """'l1'/'L1'/1 -> 'l1'; ValueError for anything that is not a level of the runbook."""
    key = f"l{level}" if isinstance(level, int) else str(level).strip().lower()
    if key not in LEVELS:
        raise ValueError(f"unknown escalation level {level!r}; use one of {', '.join(LEVELS)}")
    return key


def _send(block: NotificationBlock, body: str, subject: str) -> None:
    """Call a notification block's notify() synchronously, whether it is dispatching, sync or async."""
    if hasattr(type(block).notify, "aio"):  # Prefect's own blocks dispatch on `_sync`
        # With `_sync=True` the dispatching notify() runs to the end and returns None, no coroutine.
        block.notify(body, subject, _sync=True)  # type: ignore[call-arg, unused-coroutine]
        return
    result = block.notify(body, subject)
    if inspect.isawaitable(result):
        run_coro_as_sync(result)


class Escalation(Block):
    """The runbook's escalation path: who is told at L1 (on-call), L2 (DevOps) and L3 (lead).

    Each level is any Prefect notification block: `SlackWebhook` in production, a
    `CustomWebhookNotificationBlock` pointing at the local receiver in the embedded default.
    `notify()` raises `NotificationUndelivered` when the level's block cannot deliver, never
    staying silent.

    Examples:
        Load an escalation (the default one is named "crypto-agent") and tell the on-call engineer:
        ```python
        from blocks.escalation import Escalation

        escalation = Escalation.load("BLOCK_NAME")
        escalation.notify("l1", "data-update failed", "flow run ...: 418 from the exchange")
        ```

        Build one for production with Slack channels:
        ```python
        from prefect.blocks.notifications import SlackWebhook

        Escalation(
            l1=SlackWebhook(url="https://hooks.slack.com/services/T/B/oncall"),
            l2=SlackWebhook(url="https://hooks.slack.com/services/T/B/devops"),
            l3=SlackWebhook(url="https://hooks.slack.com/services/T/B/lead"),
        ).save("crypto-agent", overwrite=True)
        ```
    """

    _block_type_name = "Crypto Agent Escalation"
    _block_type_slug = "crypto-agent-escalation"
    _description = "The runbook's escalation path: a notification block for L1 (on-call), L2 (DevOps), L3 (lead)."
    # Prefect's page on notification blocks: each level is one of them.
    _documentation_url = HttpUrl(
        "https://www.prefect.io/docs/latest/automate/events/automations-triggers#sending-notifications-with-automations"
    )

    l1: NotificationChannel = Field(description="L1, the on-call engineer: told first, about every failure.")
    l2: NotificationChannel = Field(description="L2, DevOps: told when L1's recovery did not work.")
    l3: NotificationChannel = Field(description="L3, the lead: told for root-cause analysis and incident review.")

    @classmethod
    def _from_block_document(cls, block_document: BlockDocument) -> Escalation:
        """The block from its document, each level as the block type it was saved as."""
        # The API returns a nested block's data without its type, and pydantic would then take the
        # first member of the Union that fits (a CustomWebhook read back as a SlackWebhook). Putting
        # the referenced type's slug back lets Block.validate_block_type_slug discriminate.
        for field_name, reference in (block_document.block_document_references or {}).items():
            slug = reference.get("block_document", {}).get("block_type", {}).get("slug")
            nested = block_document.data.get(field_name)
            if slug and isinstance(nested, dict):
                block_document.data[field_name] = {**nested, "block_type_slug": slug}
        return super()._from_block_document(block_document)

    def channel(self, level: str | int) -> NotificationBlock:
        """The notification block of a level."""
        return getattr(self, level_name(level))

    def notify(self, level: str | int, subject: str, body: str) -> None:
        """Send one message to a level; NotificationUndelivered when it did not get there."""
        name = level_name(level)
        block = self.channel(name)
        kind = type(block).__name__
        # Apprise-based blocks (SlackWebhook ...) drop a URL they cannot parse and then send nothing
        # without an error: an empty client means the message would vanish.
        apprise_client = getattr(block, "_apprise_client", None)
        if apprise_client is not None and len(apprise_client) == 0:
            raise NotificationUndelivered(
                f"{name.upper()} ({LEVEL_ROLES[name]}) notification not sent: {kind} has no usable webhook URL",
                hint=f"fix the URL of the {name} block of the escalation block (a {kind} URL must look like "
                "the service's own, e.g. https://hooks.slack.com/services/...), then rerun",
            )
        try:
            with block.raise_on_failure():
                _send(block, body, subject)
        except Exception as exc:  # any failure of any block type is the same fact: nobody was told
            reason = str(exc) or type(exc).__name__
            raise NotificationUndelivered(
                f"{name.upper()} ({LEVEL_ROLES[name]}) notification {subject!r} not delivered by {kind}: {reason}",
                hint=f"check that the {name} webhook is reachable and its URL is right "
                "(embedded default: run `crypto-agent receiver`), then rerun `crypto-agent blocks-register` "
                "if the URL changed",
            ) from exc
