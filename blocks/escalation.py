"""The runbook's escalation path as a Prefect Block: one or more notification blocks per level (L1, L2, L3)."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from prefect import get_client
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.blocks.notifications import (
    CustomWebhookNotificationBlock,
    DiscordWebhook,
    MattermostWebhook,
    MicrosoftTeamsWebhook,
    OpsgenieWebhook,
    PagerDutyWebHook,
    SlackWebhook,
)
from prefect.client.schemas.objects import BlockDocument
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import Field, HttpUrl, field_validator
from pydantic.json_schema import GenerateJsonSchema

from crypto_agent.errors import CryptoAgentError

Level = Literal["l1", "l2", "l3"]
LEVELS: tuple[Level, ...] = ("l1", "l2", "l3")
LEVEL_ROLES: dict[Level, str] = {"l1": "on-call", "l2": "DevOps", "l3": "lead"}
DEFAULT_ESCALATION = "crypto-agent"
WAR_ROOM = "war_room"  # the runbook's "live trading affected: L3 war room", a channel of its own beside L3
CHANNEL_FIELDS: tuple[str, ...] = (*LEVELS, WAR_ROOM)
REASON_MAX_CHARS = 200  # of the reason quoted in a fallback's subject

# Prefect registers a block field's type, so it must name concrete block types, not the
# NotificationBlock interface: every notification block Prefect ships that an on-call rota uses.
NotificationChannel = (
    SlackWebhook
    | PagerDutyWebHook
    | OpsgenieWebhook
    | MicrosoftTeamsWebhook
    | DiscordWebhook
    | MattermostWebhook
    | CustomWebhookNotificationBlock
)
# Keys Block's serializer adds to a saved nested block; meaningless in an inline copy of it.
_DOCUMENT_KEYS = ("_block_document_id", "_block_document_name", "_is_anonymous")
_SCHEMAS: dict[tuple[Any, ...], dict[str, Any]] = {}
_REGISTERED: dict[str, UUID] = {}  # Prefect API URL -> the Escalation schema id this process registered there


class NotificationUndelivered(CryptoAgentError):
    """A notification could not be delivered: the webhook URL is malformed, down, or said no.

    `level` is the level it was meant for, `fell_back_to` the higher level that received it instead
    (None when none did), `failed` what went wrong, one line per block tried.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        level: Level | None = None,
        fell_back_to: Level | None = None,
        failed: list[str] | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.level = level
        self.fell_back_to = fell_back_to
        self.failed = failed or []


@dataclass(frozen=True)
class Delivery:
    """Where a message went: the level, the blocks that delivered it and those that failed ("<block>: <why>")."""

    level: Level
    delivered: list[str]
    failed: list[str]


def level_name(level: str | int) -> Level:
    """'l1'/'L1'/1 -> 'l1'; ValueError for anything that is not a level of the runbook."""
    key = f"l{level}" if isinstance(level, int) else str(level).strip().lower()
    if key not in LEVELS:
        raise ValueError(f"unknown escalation level {level!r}; use one of {', '.join(LEVELS)}")
    return key


def level_label(level: Level) -> str:
    """'l1' -> 'L1 (on-call)'."""
    return f"{level.upper()} ({LEVEL_ROLES[level]})"


def _send(block: NotificationBlock, body: str, subject: str) -> None:
    """Call a notification block's notify() synchronously, whether it is dispatching, sync or async."""
    if hasattr(type(block).notify, "aio"):  # Prefect's own blocks dispatch on `_sync`
        # With `_sync=True` the dispatching notify() runs to the end and returns None, no coroutine.
        block.notify(body, subject, _sync=True)  # type: ignore[call-arg, unused-coroutine]
        return
    result = block.notify(body, subject)
    if inspect.isawaitable(result):
        run_coro_as_sync(result)


def _deliver(block: NotificationBlock, body: str, subject: str) -> str | None:
    """Send through one block; None when it delivered, else why not."""
    # Apprise-based blocks (SlackWebhook ...) drop a URL they cannot parse and then send nothing
    # without an error: an empty client means the message would vanish.
    apprise_client = getattr(block, "_apprise_client", None)
    if apprise_client is not None and len(apprise_client) == 0:
        return "no usable webhook URL"
    try:
        with block.raise_on_failure():
            _send(block, body, subject)
    except Exception as exc:  # noqa: BLE001 (any failure of any block type is the same fact: nobody was told)
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _block_label(level: Level, index: int, block: NotificationBlock) -> str:
    """'l1[0] SlackWebhook' or, for a saved block, "l1[0] SlackWebhook 'crypto-agent-l1'"."""
    label = f"{level}[{index}] {type(block).__name__}"
    name = getattr(block, "_block_document_name", None)
    return f"{label} {name!r}" if name else label


class Escalation(Block):
    """The runbook's escalation path: who is told at L1 (on-call), L2 (DevOps) and L3 (lead).

    Each level is a list of Prefect notification blocks (Slack, PagerDuty, Opsgenie, Microsoft Teams,
    Discord, Mattermost, custom webhook); one block alone is taken as a list of one. `notify()` sends
    to every block of the level. When none of them delivered, the message goes to the next level up
    with the subject prefixed "[undelivered to L1 (on-call): <why>]", and `NotificationUndelivered`
    is raised all the same (`fell_back_to` says who got it): never silence.

    Examples:
        Load an escalation (the default one is named "crypto-agent") and tell the on-call engineer:
        ```python
        from blocks.escalation import Escalation

        escalation = Escalation.load("BLOCK_NAME")
        escalation.notify("l1", "data-update failed", "flow run ...: 418 from the exchange")
        ```

        Build one for production: on-call paged on PagerDuty and Slack, Slack channels above:
        ```python
        from prefect.blocks.notifications import PagerDutyWebHook, SlackWebhook

        Escalation(
            l1=[
                PagerDutyWebHook(integration_key="...", api_key="..."),
                SlackWebhook(url="https://hooks.slack.com/services/T/B/oncall"),
            ],
            l2=SlackWebhook(url="https://hooks.slack.com/services/T/B/devops"),
            l3=SlackWebhook(url="https://hooks.slack.com/services/T/B/lead"),
        ).save("crypto-agent", overwrite=True)
        ```
    """

    _block_type_name = "Crypto Agent Escalation"
    _block_type_slug = "crypto-agent-escalation"
    _description = (
        "The runbook's escalation path: notification blocks for L1 (on-call), L2 (DevOps), L3 (lead); "
        "a level nobody hears falls back to the next."
    )
    # Prefect's page on notification blocks: each level is a list of them.
    _documentation_url = HttpUrl(
        "https://www.prefect.io/docs/latest/automate/events/automations-triggers#sending-notifications-with-automations"
    )

    l1: list[NotificationChannel] = Field(
        min_length=1, description="L1, the on-call engineer: told first, about every failure (one or more blocks)."
    )
    l2: list[NotificationChannel] = Field(
        min_length=1,
        description="L2, DevOps: told when L1's recovery did not work, or when L1 cannot be reached (one or more).",
    )
    l3: list[NotificationChannel] = Field(
        min_length=1,
        description="L3, the lead: told for root-cause analysis and incident review, and when L2 cannot be reached.",
    )

    war_room: list[NotificationChannel] = Field(
        default_factory=list,
        description="The war room: told beside L3 when live trading is affected (none: L3 alone).",
    )

    @field_validator("l1", "l2", "l3", "war_room", mode="before")
    @classmethod
    def _one_block_is_a_level_of_one(cls, value: Any) -> Any:
        # The first version held one block per level: such a block, or its saved data, is a list of one.
        if value is None:
            return []
        return list(value) if isinstance(value, list | tuple) else [value]

    @classmethod
    def model_json_schema(  # type: ignore[override]  # Block's own signature, which it overrides the same way
        cls,
        by_alias: bool = True,
        ref_template: str = "#/definitions/{model}",
        schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
        mode: Literal["validation", "serialization"] = "validation",
    ) -> dict[str, Any]:
        """The block's JSON schema, computed once per process; each level is a secret field as a whole."""
        # Block.save() asks for it a few dozen times (once per field when it serializes) and each
        # computation walks every member of the Union with its nested schemas: seconds per save.
        key = (cls, by_alias, ref_template, schema_generator, mode)
        if key not in _SCHEMAS:
            schema = super().model_json_schema(by_alias, ref_template, schema_generator, mode)
            # The server hides secrets in what it returns (the UI, reads without include_secrets) by
            # dotted path, and its paths do not enter lists: "l1.url" would leave the URL of a block in
            # the l1 list in clear. "l1.*" hides the inline level whole. Loading reads with secrets.
            secrets = schema.setdefault("secret_fields", [])
            secrets.extend(f"{level}.*" for level in CHANNEL_FIELDS if f"{level}.*" not in secrets)
            _SCHEMAS[key] = schema
        return copy.deepcopy(_SCHEMAS[key])

    @classmethod
    def register_type_and_schema(cls, client: Any = None, **kwargs: Any) -> Any:
        """Register the block type, its schema and every nested block type; a save does it once per process."""
        # Block.save() registers the whole tree again on every save: 21 nested registrations here (7 block
        # types in each of 3 levels), each with a client of its own, about 2 s. A save (`_sync=True`) skips
        # that when this process registered the tree against this API and the server still has the schema.
        api = str(get_current_settings().api.url)
        if kwargs.get("_sync") is True and _REGISTERED.get(api) == cls._block_schema_id and cls._schema_on_server():
            return None
        result = super().register_type_and_schema(client, **kwargs)
        if not inspect.isawaitable(result) and cls._block_schema_id is not None:
            _REGISTERED[api] = cls._block_schema_id
        return result

    @classmethod
    def _schema_on_server(cls) -> bool:
        """Whether the server knows this class's block schema (not so after a reset of its database)."""
        with get_client(sync_client=True) as client:
            try:
                schema = client.read_block_schema_by_checksum(
                    checksum=cls._calculate_schema_checksum(), version=cls.get_block_schema_version()
                )
            except ObjectNotFound:
                return False
        return schema.id == cls._block_schema_id

    def _to_block_document(
        self,
        name: str | None = None,
        block_schema_id: UUID | None = None,
        block_type_id: UUID | None = None,
        is_anonymous: bool | None = None,
        include_secrets: bool = False,
    ) -> BlockDocument:
        """The document to save; a level that is one saved block stays a reference to that block's document."""
        document = super()._to_block_document(name, block_schema_id, block_type_id, is_anonymous, include_secrets)
        for level in CHANNEL_FIELDS:
            blocks = getattr(self, level)
            saved_id = blocks[0]._block_document_id if len(blocks) == 1 else None
            if saved_id is not None:
                # The server keeps block references only at a top-level key, not inside a list: a level
                # of one saved block is stored as that reference, as the first version did (edits of
                # that document reach the escalation; automations find its id to notify it).
                document.data[level] = {"$ref": {"block_document_id": saved_id}}
            else:
                # Inline copies; each keeps the block_type_slug Block's serializer wrote, which is what
                # tells the Union's members apart on load.
                document.data[level] = [
                    {k: v for k, v in item.items() if k not in _DOCUMENT_KEYS} for item in document.data[level]
                ]
        return document

    @classmethod
    def _from_block_document(cls, block_document: BlockDocument) -> Escalation:
        """The block from its document, each block of each level as the block type it was saved as."""
        # A referenced level (one saved block) comes back as that document's data without its type, and
        # pydantic would then take the first member of the Union that fits (a CustomWebhook read back as
        # a SlackWebhook). Putting the referenced type's slug back lets Block.validate_block_type_slug
        # discriminate. Blocks inline in a list carry their slug already.
        references = block_document.block_document_references or {}
        for field_name, reference in references.items():
            slug = reference.get("block_document", {}).get("block_type", {}).get("slug")
            nested = block_document.data.get(field_name)
            if slug and isinstance(nested, dict):
                block_document.data[field_name] = {**nested, "block_type_slug": slug}
        escalation = super()._from_block_document(block_document)
        # Block only sets the document id and name on a nested block held directly by a field, not in a
        # list: set them so that saving the escalation again keeps the reference.
        for level in CHANNEL_FIELDS:
            info = (references.get(level) or {}).get("block_document") or {}
            blocks = getattr(escalation, level)
            if info.get("id") and len(blocks) == 1:
                blocks[0]._block_document_id = UUID(str(info["id"]))
                blocks[0]._block_document_name = info.get("name")
                blocks[0]._is_anonymous = info.get("is_anonymous")
        return escalation

    def tell_war_room(self, subject: str, body: str) -> Delivery | None:
        """Send a message to every block of the war room (live trading affected); None when it has none. No
        fallback: L3 gets the same message."""
        if not self.war_room:
            return None
        delivered, failed = [], []
        for index, block in enumerate(self.war_room):
            label = f"war room[{index}] {type(block).__name__}"
            why = _deliver(block, body, subject)
            if why is None:
                delivered.append(label)
            else:
                failed.append(f"{label}: {why}")
        return Delivery(level="l3", delivered=delivered, failed=failed)

    def channels(self, level: str | int) -> list[NotificationBlock]:
        """The notification blocks of a level."""
        return list(getattr(self, level_name(level)))

    def channel(self, level: str | int) -> NotificationBlock:
        """The first notification block of a level (the only one in the first version's one-block levels)."""
        return self.channels(level)[0]

    def deliver(self, level: str | int, subject: str, body: str) -> Delivery:
        """Send one message to every block of one level, no fallback; what each did."""
        name = level_name(level)
        delivered, failed = [], []
        for index, block in enumerate(self.channels(name)):
            label = _block_label(name, index, block)
            why = _deliver(block, body, subject)
            if why is None:
                delivered.append(label)
            else:
                failed.append(f"{label}: {why}")
        return Delivery(level=name, delivered=delivered, failed=failed)

    def notify(self, level: str | int, subject: str, body: str) -> Delivery:
        """Send one message to every block of a level; what was delivered and what failed.

        When no block of the level delivered, the message goes to the next level up (l1 -> l2 -> l3),
        its subject prefixed with why, and NotificationUndelivered is raised after that, saying which
        level got it (`fell_back_to`, None when none did).
        """
        first = level_name(level)
        failed: list[str] = []
        prefixes: list[str] = []
        tried: list[Level] = []
        for current in LEVELS[LEVELS.index(first):]:
            attempt = self.deliver(current, " ".join([*prefixes, subject]), body)
            if attempt.delivered and not tried:
                return attempt  # some blocks may have failed: the caller sees them in `failed`
            failed.extend(attempt.failed)
            if attempt.delivered:
                raise self._undelivered(first, subject, tried, failed, fell_back_to=current)
            tried.append(current)
            reason = "; ".join(why.split(": ", 1)[-1] for why in attempt.failed)
            if len(reason) > REASON_MAX_CHARS:
                reason = reason[: REASON_MAX_CHARS - 3] + "..."
            prefixes.append(f"[undelivered to {level_label(current)}: {reason}]")
        raise self._undelivered(first, subject, tried, failed, fell_back_to=None)

    @staticmethod
    def _undelivered(
        level: Level, subject: str, tried: list[Level], failed: list[str], fell_back_to: Level | None
    ) -> NotificationUndelivered:
        """The error for a message its level did not get: what failed, who got it instead, what to fix."""
        then = f"; sent to {level_label(fell_back_to)} instead" if fell_back_to else "; no level took it"
        if len(tried) > 1:
            then = f" nor by {', '.join(level_label(lvl) for lvl in tried[1:])}{then}"
        message = (
            f"{level_label(level)} notification {subject!r} not delivered by any of its blocks{then}: "
            + "; ".join(failed)
        )
        hints = []
        if any(why.endswith(": no usable webhook URL") for why in failed):
            hints.append(
                "fix the URL of each block with no usable webhook URL (a SlackWebhook URL must look like the "
                "service's own, e.g. https://hooks.slack.com/services/...)"
            )
        if not all(why.endswith(": no usable webhook URL") for why in failed):
            hints.append(
                f"check that the webhook(s) of {', '.join(tried)} are reachable and their URLs right "
                "(embedded default: run `crypto-agent receiver`), then rerun `crypto-agent blocks-register` "
                "if a URL changed"
            )
        hint = "; ".join(hints)
        return NotificationUndelivered(message, hint, level=level, fell_back_to=fell_back_to, failed=failed)
