"""Off-host copies of the daily verified backup: an S3-compatible bucket through a prefect-aws S3Bucket block.

The backup flow calls `upload_backup` after a good local backup: the file first, its manifest last (so a
manifest in the bucket always describes a complete object), the object's size checked and its sha256 kept in
its metadata. An unreachable bucket never fails the flow and never touches the local copy: the result says
so, and `tell_l2_offhost_failed` tells L2. A restore calls `download_backup`, which refuses (nothing written
at the destination) a copy that is missing, truncated, foreign or of a wrong sha256, so it can try the next
source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

# boto3 and botocore ship no type hints (boto3-stubs is not a dependency).
from boto3.exceptions import Boto3Error  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import SecretStr

from blocks import load_block
from crypto_agent.backup import (
    BACKUP_NAME_RE,
    BAD,
    GOOD,
    SQLITE_HEADER,
    BackupError,
    BackupInfo,
    backup_info,
    file_sha256,
    manifest_path,
)
from crypto_agent.settings import Settings
from flows.notify import notify_level

# A dead endpoint must fail within about 10 s: connection refused at once, a black hole after
# CONNECT_TIMEOUT_S or READ_TIMEOUT_S per attempt, MAX_ATTEMPTS attempts (the first one included: botocore's
# own `max_attempts` counts retries only, `total_max_attempts` counts them all).
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 3
MAX_ATTEMPTS = 2
BOUNDED = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
           "retries": {"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"}}
CHUNK = 4 * 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What an S3 endpoint, its client or the local disk raise; anything else is a bug worth its traceback.
S3_FAILURES = (BotoCoreError, ClientError, Boto3Error, OSError)


# --- errors ---


class OffhostError(BackupError):
    """The off-host copy could not be made or used; the local backups were not touched."""


class OffhostBlockMissing(OffhostError):
    """The S3Bucket block that offhost_block names cannot be loaded."""

    exit_code = 2


class OffhostRefused(OffhostError):
    """A copy in the bucket is missing, truncated, foreign or of a wrong sha256; nothing was written."""


# --- values ---


@dataclass(frozen=True)
class OffhostResult:
    """One upload of a backup and its manifest to the bucket: where, how much, how long, and how it went."""

    key: str
    bytes: int
    seconds: float
    ok: bool
    error: str = ""
    bucket: str = ""
    skipped: bool = False  # no offhost_block configured: nothing to do, nothing wrong

    @property
    def message(self) -> str:
        """One line for an operator."""
        if self.skipped:
            return "no off-host copy: offhost_block is not set"
        where = f"s3://{self.bucket}/{self.key}"
        if self.ok:
            return f"off-host copy {where}: {self.bytes} bytes in {self.seconds:.1f} s"
        return f"off-host copy {where} FAILED after {self.seconds:.1f} s: {self.error}"


@dataclass(frozen=True)
class OffhostBackup:
    """A backup object in the bucket, and whether its manifest is there beside it."""

    name: str
    key: str
    size: int
    modified: datetime | None
    has_manifest: bool


# --- the block and its client ---


def load_bucket(cfg: Settings) -> S3Bucket | None:
    """The S3Bucket block that cfg.offhost_block names; None when it is empty (no off-host copy)."""
    name = cfg.offhost_block.strip()
    if not name:
        return None
    hint = (f"save it with flows.offhost.save_offhost_block({name!r}, bucket, endpoint_url, access_key_id, "
            "secret_access_key) (or `prefect block create s3-bucket`), or set offhost_block to \"\" "
            "for no off-host copy")
    try:
        return load_block(S3Bucket, name)
    except (ValueError, ObjectNotFound):
        other = _block_types_named(name)
        found = f" (there is a {' and a '.join(other)} block of that name)" if other else ""
        raise OffhostBlockMissing(f"no S3 Bucket block {name!r}{found}", hint=hint) from None
    except Exception as exc:  # noqa: BLE001 (the Prefect API is down or refuses us: say so, whatever it raised)
        raise OffhostError(f"cannot load the S3 Bucket block {name!r} from the Prefect API: {exc}",
                           hint="check that the Prefect server is up (PREFECT_API_URL), then rerun") from None


def _block_types_named(name: str) -> list[str]:
    """Slugs of the block types that have a document called `name` (a block saved under the wrong type)."""
    try:
        with get_client(sync_client=True) as client:
            docs = client.read_block_documents(include_secrets=False)
    except Exception:  # noqa: BLE001 (only an embellishment of the error message)
        return []
    return sorted({d.block_type.slug for d in docs if d.name == name and d.block_type is not None})


def s3_client(bucket: S3Bucket) -> Any:
    """A boto3 S3 client of the block's credentials and endpoint, with connect/read timeouts and retries bounded."""
    creds = bucket.credentials
    params = creds.aws_client_parameters.get_params_override()
    own = params.get("config")
    params["config"] = own.merge(Config(**BOUNDED)) if isinstance(own, Config) else Config(**BOUNDED)
    return creds.get_boto3_session().client("s3", **params)


def offhost_key(cfg: Settings, bucket: S3Bucket, file_name: str) -> str:
    """The object key of a file: {bucket_folder}/{offhost_prefix}/{file name}, empty parts left out."""
    parts = [p.strip("/") for p in (bucket.bucket_folder, cfg.offhost_prefix, file_name)]
    return "/".join(p for p in parts if p)


def _credentials(endpoint_url: str | None, access_key_id: str, secret_access_key: str,
                 region: str) -> AwsCredentials:
    return AwsCredentials(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=SecretStr(secret_access_key),
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url or None, config=BOUNDED),
    )


def bucket_problem(bucket: str, endpoint_url: str | None, access_key_id: str, secret_access_key: str,
                   region: str = "us-east-1") -> str:
    """Why these credentials cannot use the bucket (HeadBucket, bounded timeouts), or "" when they can;
    nothing is saved."""
    unsaved = S3Bucket(bucket_name=bucket,
                       credentials=_credentials(endpoint_url, access_key_id, secret_access_key, region))
    try:
        s3_client(unsaved).head_bucket(Bucket=bucket)
    except S3_FAILURES as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def save_offhost_block(name: str, bucket: str, endpoint_url: str | None, access_key_id: str,
                       secret_access_key: str, region: str = "us-east-1", *, overwrite: bool = True) -> S3Bucket:
    """Save the S3Bucket block `name` (and its AwsCredentials `{name}-credentials`, the secret in a SecretStr).

    endpoint_url None means AWS itself; a MinIO, Ceph or moto endpoint otherwise. Nothing is logged.
    """
    credentials = _credentials(endpoint_url, access_key_id, secret_access_key, region)
    credentials.save(f"{name}-credentials", overwrite=overwrite)
    block = S3Bucket(bucket_name=bucket, credentials=load_block(AwsCredentials, f"{name}-credentials"))
    block.save(name, overwrite=overwrite)
    return load_block(S3Bucket, name)


# --- upload ---


def _upload(client: Any, bucket: str, key: str, info: BackupInfo) -> tuple[int, str]:
    """Upload one good backup and then its manifest; (bytes, problem or "")."""
    info = backup_info(info.path)  # the manifest as it is now: the dry restore marks it good after create()
    if info.status != GOOD or not info.sha256:
        return 0, f"not uploading {info.name}: it is {info.status}, not a verified good backup"
    sha, size = file_sha256(info.path)
    if sha != info.sha256:
        return 0, (f"not uploading {info.name}: its sha256 {sha[:12]} differs from its manifest's "
                   f"{info.sha256[:12]} (the local file changed)")
    client.upload_file(str(info.path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})
    head = client.head_object(Bucket=bucket, Key=key)
    got, got_sha = int(head["ContentLength"]), head.get("Metadata", {}).get("sha256")
    if got != size or got_sha != sha:
        return size, (f"the uploaded object has {got} bytes and sha256 {str(got_sha)[:12]}, the backup "
                      f"{size} and {sha[:12]}; its manifest was not uploaded")
    client.put_object(Bucket=bucket, Key=_manifest_key(key), Body=info.manifest_path.read_bytes(),
                      ContentType="application/json", Metadata={"sha256": sha})
    return size, ""


@task(name="upload-backup-offhost", cache_policy=NO_CACHE)
def upload_backup(cfg: Settings, info: BackupInfo) -> OffhostResult:
    """Copy a good local backup and its manifest to the off-host bucket; never raises, never touches the local copy."""
    started = time.perf_counter()
    logger = get_run_logger()
    try:
        bucket = load_bucket(cfg)
    except OffhostError as exc:
        result = OffhostResult(info.name, 0, time.perf_counter() - started, False, str(exc))
        logger.error("%s", result.message)
        return result
    if bucket is None:
        return OffhostResult("", 0, 0.0, True, skipped=True)
    key = offhost_key(cfg, bucket, info.name)
    size, error = 0, ""
    try:
        size, error = _upload(s3_client(bucket), bucket.bucket_name, key, info)
    except S3_FAILURES as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 (the local backup is made: an off-host failure must not fail its flow)
        error = f"unexpected {type(exc).__name__}: {exc}"
    result = OffhostResult(key, size, time.perf_counter() - started, not error, error, bucket.bucket_name)
    if result.ok:
        logger.info("%s", result.message)
    else:
        logger.error("%s; the local copy %s is kept as it was", result.message, info.path)
    return result


def tell_l2_offhost_failed(result: OffhostResult, info: BackupInfo) -> tuple[str, str]:
    """Tell L2 (notify-level) that the off-host copy failed while the local one was made; the subject and body."""
    subject, body = offhost_message(result, info)
    notify_level("l2", subject, body)
    return subject, body


def offhost_message(result: OffhostResult, info: BackupInfo) -> tuple[str, str]:
    """The page for L2 when the off-host copy failed while the local one was made: subject and body."""
    subject = f"[crypto-agent] off-host copy of {info.name} failed (the local backup is good)"
    body = "\n".join([
        result.message,
        f"local copy: {info.path} ({info.size} bytes, sha256 {str(info.sha256)[:12]}), kept and verified",
        "until an off-host copy succeeds, a loss of this host loses the backups too",
        ("what to do: check the bucket's endpoint and credentials (the S3 Bucket block named by offhost_block), "
         "then rerun the backup deployment; the next daily backup tries again"),
    ])
    return subject, body


# --- list and download ---


def _manifest_key(key: str) -> str:
    return key[: -len(".db")] + ".json"


@task(name="list-offhost-backups", cache_policy=NO_CACHE)
def list_offhost(cfg: Settings) -> list[OffhostBackup]:
    """The backups in the off-host bucket under offhost_prefix, newest first; [] when none is configured."""
    bucket = load_bucket(cfg)
    if bucket is None:
        return []
    prefix = offhost_key(cfg, bucket, "") + "/" if offhost_key(cfg, bucket, "") else ""
    objects: dict[str, dict[str, Any]] = {}
    try:
        pages = s3_client(bucket).get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket_name,
                                                                            Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                objects[obj["Key"]] = obj
    except S3_FAILURES as exc:
        raise OffhostError(f"cannot list s3://{bucket.bucket_name}/{prefix}: {type(exc).__name__}: {exc}",
                           hint="check the bucket's endpoint and credentials; use a local backup meanwhile") from None
    out = []
    for key, obj in objects.items():
        name = key.rsplit("/", 1)[-1]
        if key[len(prefix):] == name and BACKUP_NAME_RE.match(name):
            out.append(OffhostBackup(name, key, int(obj["Size"]), obj.get("LastModified"),
                                     _manifest_key(key) in objects))
    return sorted(out, key=lambda b: b.name, reverse=True)


def _fetch_manifest(client: Any, bucket: str, key: str, name: str) -> dict[str, Any]:
    """The manifest of `name` in the bucket, checked to describe that file; OffhostRefused otherwise."""
    mkey = _manifest_key(key)
    try:
        raw = client.get_object(Bucket=bucket, Key=mkey)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            raise OffhostRefused(f"no off-host copy of {name}: s3://{bucket}/{mkey} does not exist",
                                 hint="list the copies with flows.offhost.list_offhost; try the next source") from None
        raise
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise OffhostRefused(f"the manifest s3://{bucket}/{mkey} is unreadable: {exc}",
                             hint="try the next source (a local backup or another day)") from None
    problems = []
    if manifest.get("file") != name:
        problems.append(f"it describes {manifest.get('file')!r}, not {name}")
    if not SHA256_RE.match(str(manifest.get("sha256") or "")):
        problems.append("it has no sha256")
    if not isinstance(manifest.get("size"), int):
        problems.append("it has no size")
    if manifest.get("status") == BAD:
        problems.append("it marks the backup bad")
    if problems:
        raise OffhostRefused(f"foreign or unusable manifest s3://{bucket}/{mkey}: {'; '.join(problems)}",
                             hint="try the next source (a local backup or another day)")
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@task(name="download-backup-offhost", cache_policy=NO_CACHE)
def download_backup(cfg: Settings, name: str, dest_dir: Path) -> Path:
    """Fetch the off-host copy of backup `name` and its manifest into dest_dir, checked; the backup's path there.

    Refuses (OffhostRefused, nothing left at the destination) a copy that is missing, truncated, not a SQLite
    file, or whose sha256 differs from its manifest, and a destination that already holds that backup.
    """
    if not BACKUP_NAME_RE.match(name):
        raise OffhostRefused(f"{name!r} is not a backup file name (db_backup_YYYYMMDD.db)",
                             hint="list the copies with flows.offhost.list_offhost")
    bucket = load_bucket(cfg)
    if bucket is None:
        raise OffhostError("no off-host bucket is configured (offhost_block is empty)",
                           hint="set offhost_block to the S3 Bucket block's name, or restore from a local backup")
    dest_dir = Path(dest_dir)
    final = dest_dir / name
    if final.exists() or manifest_path(final).exists():
        raise OffhostRefused(f"{final} (or its manifest) already exists; not overwriting it",
                             hint="restore from that file, or download into an empty folder")
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".{name}.offhost.tmp"
    key = offhost_key(cfg, bucket, name)
    where = f"s3://{bucket.bucket_name}/{key}"
    try:
        client = s3_client(bucket)
        manifest = _fetch_manifest(client, bucket.bucket_name, key, name)
        try:
            obj = client.get_object(Bucket=bucket.bucket_name, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise OffhostRefused(f"no off-host copy of {name}: {where} does not exist (its manifest does)",
                                     hint="try the next source (a local backup or another day)") from None
            raise
        h = hashlib.sha256()
        size = 0
        head = b""
        with open(tmp, "wb") as f:
            for chunk in obj["Body"].iter_chunks(CHUNK):
                h.update(chunk)
                f.write(chunk)
                if len(head) < len(SQLITE_HEADER):
                    head += chunk[: len(SQLITE_HEADER)]
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        sha = h.hexdigest()
        problems = []
        if size != manifest["size"]:
            problems.append(f"{size} bytes, the manifest says {manifest['size']} (truncated or replaced)")
        if sha != manifest["sha256"]:
            problems.append(f"sha256 {sha[:12]}, the manifest says {manifest['sha256'][:12]}")
        if not head.startswith(SQLITE_HEADER):
            problems.append("not a SQLite database (its header is wrong)")
        if problems:
            raise OffhostRefused(f"the off-host copy {where} is refused: {'; '.join(problems)}; nothing was written "
                                 f"to {dest_dir}", hint="try the next source (a local backup or another day)")
        os.replace(tmp, final)
        try:
            _write_json(manifest_path(final), manifest)
        except BaseException:
            final.unlink()
            raise
    except S3_FAILURES as exc:
        raise OffhostError(f"cannot fetch {where}: {type(exc).__name__}: {exc}; nothing was written to {dest_dir}",
                           hint="check the bucket's endpoint and credentials; try the next source") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if created and not final.exists():
            with contextlib.suppress(OSError):
                dest_dir.rmdir()
    get_run_logger().info("fetched %s to %s: %d bytes, sha256 %s matches its manifest", where, final, size, sha[:12])
    return final
