"""Off-host copies against a real S3 endpoint (moto's server on 127.0.0.1): upload, download byte-identical,
refusals that write nothing, a dead bucket that keeps the local copy and tells L2, a missing block."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for s3_kit

from flow_kit import wait_for_messages
from prefect.blocks.system import Secret
from s3_kit import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoS3, black_hole, moto_s3

from crypto_agent import backup
from crypto_agent.backup import BackupInfo
from crypto_agent.errors import CryptoAgentError
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Candle, Store
from flows.offhost import (
    OffhostBlockMissing,
    OffhostRefused,
    download_backup,
    list_offhost,
    load_bucket,
    save_offhost_block,
    tell_l2_offhost_failed,
    upload_backup,
)

HOUR = 3_600_000
T0 = 1_790_000_000_000 // (4 * HOUR) * (4 * HOUR)
NOW = datetime(2026, 3, 15, 3, 0, tzinfo=UTC)
NAME = "db_backup_20260315.db"
KEY = f"backups/{NAME}"
MANIFEST_KEY = "backups/db_backup_20260315.json"


def candles(n: int, step: int, price: float) -> list[Candle]:
    return [(T0 + i * step, price + i, price + i + 1, price + i - 1, price + i + 0.5, 10.0 + i,
             T0 + (i + 1) * step - 1, (10.0 + i) * price, 100 + i) for i in range(n)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture
def bucket_name(s3: MotoS3) -> str:
    """A fresh bucket (moto keeps its buckets in the process, across servers)."""
    name = f"offhost-{uuid.uuid4().hex[:10]}"
    s3.client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def cfg(tmp_path: Path, s3: MotoS3, bucket_name: str) -> Settings:
    """Settings for a home in tmp_path whose offhost_block is a saved S3Bucket block on the moto server."""
    block = f"offhost-{uuid.uuid4().hex[:10]}"
    save_offhost_block(block, bucket_name, s3.url, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION)
    return load_settings(home=str(tmp_path), offhost_block=block)


@pytest.fixture
def good_backup(cfg: Settings) -> BackupInfo:
    """A real, verified backup of a small real store: backup.create() with its dry restore."""
    cfg.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{cfg.db_path}")
    for i, sym in enumerate(("BTCUSDT", "ETHUSDT")):
        store.upsert_candles(sym, "4h", candles(300, 4 * HOUR, 100.0 * (i + 1)))
        store.upsert_candles(sym, "1h", candles(200, HOUR, 100.0 * (i + 1)))
    store.close()
    info = backup.create(cfg.db_path, cfg.backup_dir, now=NOW)
    assert info.status == backup.GOOD and info.name == NAME
    return info


def uploaded(cfg: Settings, info: BackupInfo) -> None:
    result = upload_backup(cfg, info)
    assert result.ok, result.error


class TestUploadAndDownload:
    def test_a_good_backup_goes_up_with_its_sha256_and_comes_back_byte_identical(
        self, cfg: Settings, s3: MotoS3, bucket_name: str, good_backup: BackupInfo, tmp_path: Path
    ) -> None:
        result = upload_backup(cfg, good_backup)
        assert result.ok and not result.error and not result.skipped
        assert (result.key, result.bucket, result.bytes) == (KEY, bucket_name, good_backup.size)
        head = s3.client.head_object(Bucket=bucket_name, Key=KEY)
        assert head["ContentLength"] == good_backup.size
        assert head["Metadata"]["sha256"] == good_backup.sha256
        manifest = json.loads(s3.client.get_object(Bucket=bucket_name, Key=MANIFEST_KEY)["Body"].read())
        assert manifest["file"] == NAME and manifest["sha256"] == good_backup.sha256

        [listed] = list_offhost(cfg)
        assert (listed.name, listed.key, listed.size, listed.has_manifest) == (NAME, KEY, good_backup.size, True)

        got = download_backup(cfg, NAME, tmp_path / "restore-source")
        assert got == tmp_path / "restore-source" / NAME
        assert got.read_bytes() == good_backup.path.read_bytes()
        assert backup.backup_info(got).status == backup.GOOD
        assert backup.backup_info(got).sha256 == good_backup.sha256
        assert sorted(p.name for p in got.parent.iterdir()) == [NAME, "db_backup_20260315.json"]

    def test_an_unverified_backup_is_not_uploaded(self, cfg: Settings, s3: MotoS3, bucket_name: str) -> None:
        cfg.db_path.parent.mkdir(parents=True, exist_ok=True)
        Store(f"sqlite:///{cfg.db_path}").close()
        info = backup.create(cfg.db_path, cfg.backup_dir, now=NOW, verify=False)
        result = upload_backup(cfg, info)
        assert not result.ok and "not a verified good backup" in result.error
        assert "Contents" not in s3.client.list_objects_v2(Bucket=bucket_name)

    def test_no_offhost_block_configured_is_skipped_not_failed(self, tmp_path: Path, good_backup: BackupInfo) -> None:
        plain = load_settings(home=str(tmp_path), offhost_block="")
        assert load_bucket(plain) is None
        result = upload_backup(plain, good_backup)
        assert result.ok and result.skipped and result.bytes == 0


class TestDownloadRefuses:
    @pytest.mark.parametrize("damage", ["different bytes", "truncated", "not sqlite"])
    def test_a_damaged_object_is_refused_and_nothing_is_written(
        self, cfg: Settings, s3: MotoS3, bucket_name: str, good_backup: BackupInfo, tmp_path: Path, damage: str
    ) -> None:
        uploaded(cfg, good_backup)
        data = good_backup.path.read_bytes()
        body = {
            "different bytes": data[:4096] + bytes(b ^ 0xFF for b in data[4096:8192]) + data[8192:],
            "truncated": data[: len(data) // 2],
            "not sqlite": b"PK\x03\x04" + data[4:],
        }[damage]
        s3.client.put_object(Bucket=bucket_name, Key=KEY, Body=body)
        dest = tmp_path / "restore-source"
        with pytest.raises(OffhostRefused) as err:
            download_backup(cfg, NAME, dest)
        assert "refused" in str(err.value) and "try the next source" in str(err.value)
        expected = {"different bytes": "sha256", "truncated": "truncated", "not sqlite": "not a SQLite"}[damage]
        assert expected in err.value.message
        assert not dest.exists()  # not even the folder it created, nor a temporary file in it

    def test_a_missing_copy_is_refused(self, cfg: Settings, tmp_path: Path) -> None:
        dest = tmp_path / "restore-source"
        with pytest.raises(OffhostRefused, match="does not exist"):
            download_backup(cfg, NAME, dest)
        assert not dest.exists()

    def test_a_foreign_manifest_is_refused(
        self, cfg: Settings, s3: MotoS3, bucket_name: str, good_backup: BackupInfo, tmp_path: Path
    ) -> None:
        uploaded(cfg, good_backup)
        manifest = json.loads(good_backup.manifest_path.read_text())
        manifest["file"] = "db_backup_20250101.db"
        s3.client.put_object(Bucket=bucket_name, Key=MANIFEST_KEY, Body=json.dumps(manifest).encode())
        dest = tmp_path / "restore-source"
        with pytest.raises(OffhostRefused, match="foreign"):
            download_backup(cfg, NAME, dest)
        assert not dest.exists()

    def test_an_existing_file_at_the_destination_is_never_overwritten(
        self, cfg: Settings, good_backup: BackupInfo, tmp_path: Path
    ) -> None:
        uploaded(cfg, good_backup)
        dest = tmp_path / "restore-source"
        dest.mkdir()
        (dest / NAME).write_bytes(b"keep me")
        with pytest.raises(OffhostRefused, match="not overwriting"):
            download_backup(cfg, NAME, dest)
        assert (dest / NAME).read_bytes() == b"keep me"
        assert sorted(p.name for p in dest.iterdir()) == [NAME]

    def test_a_name_that_is_not_a_backup_is_refused(self, cfg: Settings, tmp_path: Path) -> None:
        with pytest.raises(OffhostRefused, match="not a backup file name"):
            download_backup(cfg, "../etc/passwd", tmp_path / "x")
        assert not (tmp_path / "x").exists()


class TestUnreachableBucket:
    def test_a_stopped_server_fails_fast_keeps_the_local_copy_and_l2_is_told(
        self, cfg: Settings, s3: MotoS3, good_backup: BackupInfo, inbox: Receiver
    ) -> None:
        before = (sha256(good_backup.path), good_backup.path.stat().st_mtime_ns,
                  good_backup.manifest_path.read_bytes())
        s3.stop()
        started = time.monotonic()
        result = upload_backup(cfg, good_backup)
        elapsed = time.monotonic() - started
        assert not result.ok and result.key == KEY
        assert "connect" in result.error.lower()
        assert elapsed < 15, f"a dead endpoint took {elapsed:.1f} s"
        after = (sha256(good_backup.path), good_backup.path.stat().st_mtime_ns,
                 good_backup.manifest_path.read_bytes())
        assert after == before
        assert backup.backup_info(good_backup.path).status == backup.GOOD

        subject, body = tell_l2_offhost_failed(result, good_backup)
        [message] = wait_for_messages(inbox, "/l2")
        assert message["body"]["subject"] == subject and NAME in subject
        assert message["body"]["body"] == body and str(good_backup.path) in body and "FAILED" in body
        assert SECRET_ACCESS_KEY not in json.dumps(message)

    def test_an_endpoint_that_never_answers_fails_within_the_bounded_timeouts(
        self, tmp_path: Path, good_backup: BackupInfo
    ) -> None:
        with black_hole() as url:
            block = f"offhost-{uuid.uuid4().hex[:10]}"
            save_offhost_block(block, "nowhere", url, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION)
            started = time.monotonic()
            result = upload_backup(load_settings(home=str(tmp_path), offhost_block=block), good_backup)
            elapsed = time.monotonic() - started
        assert not result.ok and "timeout" in result.error.lower()
        assert elapsed < 15, f"a silent endpoint took {elapsed:.1f} s"


class TestTheBlock:
    def test_an_unknown_block_name_is_a_clear_error_naming_what_to_run(self, tmp_path: Path) -> None:
        missing = load_settings(home=str(tmp_path), offhost_block=f"nope-{uuid.uuid4().hex[:8]}")
        with pytest.raises(OffhostBlockMissing) as err:
            load_bucket(missing)
        assert isinstance(err.value, CryptoAgentError) and err.value.exit_code == 2
        assert missing.offhost_block in err.value.message
        assert err.value.hint and "save_offhost_block" in err.value.hint

    def test_a_block_of_another_type_is_named_in_the_error(self, tmp_path: Path) -> None:
        name = f"wrong-{uuid.uuid4().hex[:8]}"
        Secret(value="x").save(name)
        with pytest.raises(OffhostBlockMissing, match="secret"):
            load_bucket(load_settings(home=str(tmp_path), offhost_block=name))

    def test_an_upload_through_a_missing_block_returns_the_error_instead_of_raising(
        self, tmp_path: Path, good_backup: BackupInfo
    ) -> None:
        result = upload_backup(load_settings(home=str(tmp_path), offhost_block="no-such-block"), good_backup)
        assert not result.ok and "no S3 Bucket block 'no-such-block'" in result.error

    def test_the_secret_lives_in_a_secret_field(self, cfg: Settings, bucket_name: str, s3: MotoS3) -> None:
        bucket = load_bucket(cfg)
        assert bucket is not None and bucket.bucket_name == bucket_name
        secret = bucket.credentials.aws_secret_access_key
        assert secret is not None and secret.get_secret_value() == SECRET_ACCESS_KEY
        assert SECRET_ACCESS_KEY not in repr(bucket) and SECRET_ACCESS_KEY not in str(bucket)
        assert bucket.credentials.aws_client_parameters.endpoint_url == s3.url


class TestTheBackupFlow:
    """The daily backup flow copies its good backup off the host; a bucket that is down keeps the local copy and
    tells L2 once, and the next copy that lands ends the episode."""

    def store(self, cfg: Settings) -> None:
        cfg.db_path.parent.mkdir(parents=True, exist_ok=True)
        with Store(f"sqlite:///{cfg.db_path}") as store:
            store.upsert_candles("BTCUSDT", "4h", candles(300, 4 * HOUR, 100.0))

    def test_the_backup_flow_uploads_its_backup_and_a_dead_bucket_tells_l2_once(
        self, cfg: Settings, s3: MotoS3, bucket_name: str, inbox: Receiver
    ) -> None:
        from flows.maintenance import backup_flow

        self.store(cfg)
        overrides = {"home": str(cfg.home), "offhost_block": cfg.offhost_block}
        done = backup_flow(settings=overrides, now=NOW)
        assert done["offhost"]["ok"] and done["offhost"]["key"] == KEY
        assert s3.client.head_object(Bucket=bucket_name, Key=KEY)["Metadata"]["sha256"] == done["sha256"]
        assert inbox.messages("/l2") == []
        s3.stop()
        later = datetime(2026, 3, 16, 3, 0, tzinfo=UTC)
        failed = backup_flow(settings=overrides, now=later)
        assert not failed["offhost"]["ok"] and failed["offhost"]["error"]
        local = backup.backup_info(Path(failed["backup"]))
        assert local.status == backup.GOOD  # the local copy made and good all the same
        [told] = wait_for_messages(inbox, "/l2")
        assert "off-host copy of db_backup_20260316.db failed" in told["body"]["subject"]
        backup_flow(settings=overrides, now=later)  # the bucket still down: no second page
        time.sleep(1.0)
        assert len(inbox.messages("/l2")) == 1


class TestOffhostBlockCommand:
    """`crypto-agent offhost-block NAME --bucket B --endpoint URL`, the keys from the environment."""

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        from crypto_agent.cli import main

        try:
            main(["offhost-block", *args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    def test_it_saves_the_block_the_daily_backup_then_copies_to(
        self, s3: MotoS3, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        name = f"offhost-{uuid.uuid4().hex[:10]}"
        code, out, err = self.run(capsys, name, "--bucket", bucket_name, "--endpoint", s3.url)
        assert code == 0, out + err
        assert f"saved s3-bucket/{name}" in out and f"CRYPTO_AGENT_OFFHOST_BLOCK={name}" in out
        assert SECRET_ACCESS_KEY not in out + err
        cfg = load_settings(home=str(tmp_path), offhost_block=name)
        assert load_bucket(cfg) is not None and list_offhost(cfg) == []  # the block reaches the bucket

    @pytest.mark.parametrize("problem", ["no keys", "no such bucket", "bad name"])
    def test_bad_input_says_what_to_do_and_saves_nothing(
        self, s3: MotoS3, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], problem: str,
    ) -> None:
        name = f"offhost-{uuid.uuid4().hex[:10]}"
        bucket = bucket_name
        if problem == "no keys":
            monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
            monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        else:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        if problem == "no such bucket":
            bucket = f"missing-{uuid.uuid4().hex[:10]}"
        saved_as = "Offhost_Backups" if problem == "bad name" else name
        code, out, err = self.run(capsys, saved_as, "--bucket", bucket, "--endpoint", s3.url)
        said = {"no keys": "AWS_SECRET_ACCESS_KEY are not both set", "no such bucket": "cannot be used with these keys",
                "bad name": "is not a Prefect block name"}[problem]
        assert code != 0 and said in err and "nothing was saved" in err, out + err
        assert "Traceback" not in err and SECRET_ACCESS_KEY not in out + err
        with pytest.raises(OffhostBlockMissing):
            load_bucket(load_settings(home=str(tmp_path), offhost_block=saved_as))
