"""Backup stores against a real directory and a real S3 API (moto's server, over HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tasks.backupstore import (
    PARTIAL_PREFIX,
    SHA256_XATTR,
    BackupStore,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    StoreUnavailable,
    file_sha256,
    store_from,
)
from tests.conftest import ROOT, free_port
from tests.services import MotoServer
from workers.errors import ConfigError, TransientError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MIB = 1024 * 1024
STORE_PREFIX = "caretaker/backups"
BAD_KEYS = ["../escape", "/etc/passwd", "db/../../escape", "nul\0byte", "", "db//x", "db/"]


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, and none of the host's AWS profiles or files."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3(moto: MotoServer) -> S3Client:
    """A plain boto3 client, to set up and inspect the bucket behind the store's back."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=16)
    return boto3.client("s3", endpoint_url=moto.url, config=config)


@pytest.fixture
def bucket(s3: S3Client) -> str:
    name = f"caretaker-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BackupStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto: MotoServer = request.getfixturevalue("moto")
    bucket: str = request.getfixturevalue("bucket")
    return S3Store(bucket, prefix=STORE_PREFIX, endpoint_url=moto.url)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def xattrs_work(directory: Path) -> bool:
    probe = write(directory / "xattr-probe", b"")
    try:
        os.setxattr(probe, SHA256_XATTR, b"x")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


# The contract: every store behaves the same way.


def test_round_trip_keeps_bytes_and_sha256(store: BackupStore, tmp_path: Path) -> None:
    data = os.urandom(300 * 1024)
    source = write(tmp_path / "dump" / "db.dump", data)

    stored = store.put("db/2026-12-01.dump", source)
    restored = store.get("db/2026-12-01.dump", tmp_path / "restore" / "db.dump")

    assert stored.key == "db/2026-12-01.dump"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert restored.read_bytes() == data
    assert file_sha256(restored) == stored.sha256
    assert os.listdir(restored.parent) == ["db.dump"]


def test_stat_gives_size_time_and_sha256(store: BackupStore, tmp_path: Path) -> None:
    data = b"x" * 4321
    store.put("files/etc.tar", write(tmp_path / "etc.tar", data))

    found = store.stat("files/etc.tar")

    assert found is not None
    assert (found.key, found.size) == ("files/etc.tar", 4321)
    assert found.modified.tzinfo == UTC
    assert abs(datetime.now(UTC) - found.modified) < timedelta(minutes=1)
    expected: str | None = hashlib.sha256(data).hexdigest()
    if isinstance(store, LocalStore) and not xattrs_work(tmp_path):
        expected = None
    assert found.sha256 == expected
    assert store.stat("files/other.tar") is None


def test_put_replaces_the_object(store: BackupStore, tmp_path: Path) -> None:
    store.put("db/latest.dump", write(tmp_path / "one", b"first"))
    store.put("db/latest.dump", write(tmp_path / "two", b"second"))

    restored = store.get("db/latest.dump", tmp_path / "restored")

    assert restored.read_bytes() == b"second"
    assert [found.key for found in store.list()] == ["db/latest.dump"]


def test_delete_then_stat_is_none(store: BackupStore, tmp_path: Path) -> None:
    store.put("db/old.dump", write(tmp_path / "old", b"old"))

    store.delete("db/old.dump")
    store.delete("db/old.dump")

    assert store.stat("db/old.dump") is None
    with pytest.raises(ObjectNotFound, match=r"'db/old\.dump'"):
        store.get("db/old.dump", tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_list_with_a_prefix(store: BackupStore, tmp_path: Path) -> None:
    keys = ["files/etc.tar", "db/2026-12-02.dump", "dbx/other", "db/2026-12-01.dump", "db.txt"]
    for key in keys:
        store.put(key, write(tmp_path / "src", key.encode()))

    assert [found.key for found in store.list()] == sorted(keys)
    assert [found.key for found in store.list("db/")] == [
        "db/2026-12-01.dump",
        "db/2026-12-02.dump",
    ]
    assert [found.key for found in store.list("db/2026-12-02")] == ["db/2026-12-02.dump"]
    assert [found.key for found in store.list("db")] == sorted(keys)[:4]
    assert [found.size for found in store.list("files/")] == [len("files/etc.tar")]
    assert list(store.list("nothing/")) == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_leaving_the_store_are_refused(store: BackupStore, tmp_path: Path, key: str) -> None:
    source = write(tmp_path / "src", b"data")

    with pytest.raises(ValueError, match="backup key"):
        store.put(key, source)
    with pytest.raises(ValueError, match="backup key"):
        store.stat(key)
    with pytest.raises(ValueError, match="backup key"):
        store.get(key, tmp_path / "restored")
    with pytest.raises(ValueError, match="backup key"):
        store.delete(key)


def test_listing_prefix_leaving_the_store_is_refused(store: BackupStore) -> None:
    for prefix in ("../", "/etc", "db/../.."):
        with pytest.raises(ValueError, match="listing prefix"):
            list(store.list(prefix))


# S3 only.


def test_s3_lists_more_than_one_page(
    moto: MotoServer, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    store = S3Store(bucket, prefix=STORE_PREFIX, endpoint_url=moto.url)
    with ThreadPoolExecutor(16) as pool:
        names = [f"{STORE_PREFIX}/bulk/{number:05d}.dump" for number in range(1204)]
        list(pool.map(lambda name: s3.put_object(Bucket=bucket, Key=name, Body=b"x"), names))
    s3.put_object(Bucket=bucket, Key="outside/the-prefix.dump", Body=b"x")
    # S3 keeps whole seconds: the late object must land in a later second than the others.
    time.sleep(1.01 - time.time() % 1)
    store.put("bulk/00007-late.dump", write(tmp_path / "late", b"late"))

    found = list(store.list("bulk/"))

    keys = [item.key for item in found]
    assert len(keys) == len(set(keys)) == 1205
    assert keys == sorted(keys)
    assert keys[-1] == "bulk/01203.dump"
    assert max(found, key=lambda item: item.modified).key == "bulk/00007-late.dump"
    assert all(item.sha256 is None for item in found)
    assert len(list(store.list())) == 1205


def test_s3_large_file_goes_multipart(
    moto: MotoServer, s3: S3Client, bucket: str, tmp_path: Path
) -> None:
    store = S3Store(
        bucket,
        endpoint_url=moto.url,
        multipart_threshold_bytes=5 * MIB,
        multipart_chunk_bytes=5 * MIB,
    )
    data = os.urandom(20 * MIB)
    expected = hashlib.sha256(data).hexdigest()

    stored = store.put("db/big.dump", write(tmp_path / "big.dump", data))
    small = store.put("db/small.dump", write(tmp_path / "small.dump", b"small"))
    restored = store.get("db/big.dump", tmp_path / "restore" / "big.dump")

    head = s3.head_object(Bucket=bucket, Key="db/big.dump")
    assert re.fullmatch(r'"[0-9a-f]{32}-4"', head["ETag"]), head["ETag"]
    assert "-" not in s3.head_object(Bucket=bucket, Key="db/small.dump")["ETag"]
    assert head["Metadata"] == {"sha256": expected}
    assert (stored.size, stored.sha256) == (20 * MIB, expected)
    assert small.sha256 == hashlib.sha256(b"small").hexdigest()
    assert file_sha256(restored) == expected
    assert store.stat("db/big.dump") == stored


def test_s3_missing_bucket_is_a_store_error(moto: MotoServer, tmp_path: Path) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=moto.url)
    source = write(tmp_path / "src", b"data")
    expected = f"s3 bucket 'no-such-bucket-here' at {moto.url}: NoSuchBucket"

    for call in (
        lambda: store.put("db/x.dump", source),
        lambda: store.get("db/x.dump", tmp_path / "restored"),
        lambda: store.stat("db/x.dump"),
        lambda: list(store.list("db/")),
        lambda: store.delete("db/x.dump"),
    ):
        with pytest.raises(StoreError) as caught:
            call()
        assert not isinstance(caught.value, ObjectNotFound)
        assert str(caught.value).startswith(expected), caught.value
    assert list(tmp_path.iterdir()) == [source]


def test_s3_closed_port_is_unavailable(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store("backups", endpoint_url=endpoint)
    source = write(tmp_path / "src", b"data")

    for call in (
        lambda: store.put("db/x.dump", source),
        lambda: store.stat("db/x.dump"),
        lambda: list(store.list()),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert isinstance(caught.value, TransientError)
        assert str(caught.value).startswith(f"s3 bucket 'backups' at {endpoint}: "), caught.value
        assert "EndpointConnectionError" in str(caught.value)


def test_s3_describe_leaves_out_credentials() -> None:
    store = S3Store("backups", prefix="/db/", endpoint_url="https://key:secret@s3.example:9000/")

    assert store.describe() == "s3 bucket 'backups' prefix 'db/' at https://s3.example:9000"
    assert S3Store("b", region="eu-west-1").describe() == "s3 bucket 'b' at aws region eu-west-1"


# Local only.


def test_local_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path)

    with pytest.raises(ValueError, match="through a symlink"):
        store.put("link/escape", write(tmp_path / "src", b"data"))
    assert not (tmp_path / "escape").exists()


def test_local_files_and_directories_are_private(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")

    store.put("db/2026/12/01.dump", write(tmp_path / "src", b"data"))
    restored = store.get("db/2026/12/01.dump", tmp_path / "restored")

    root = tmp_path / "store"
    for directory in (root, root / "db", root / "db/2026", root / "db/2026/12"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    assert (root / "db/2026/12/01.dump").stat().st_mode & 0o777 == 0o600
    assert restored.stat().st_mode & 0o777 == 0o600


def test_local_failed_put_leaves_no_partial_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("db/latest.dump", write(tmp_path / "src", b"good"))
    (tmp_path / "store" / "db" / "taken.dump").mkdir()

    with pytest.raises(FileNotFoundError):
        store.put("db/latest.dump", tmp_path / "missing.dump")
    with pytest.raises(StoreError, match=r"'db/taken\.dump'"):
        store.put("db/taken.dump", write(tmp_path / "big", os.urandom(3 * MIB)))

    left = sorted(path.name for path in (tmp_path / "store" / "db").iterdir())
    assert left == ["latest.dump", "taken.dump"]
    assert not any(PARTIAL_PREFIX in str(path) for path in (tmp_path / "store").rglob("*"))
    assert (tmp_path / "store" / "db" / "latest.dump").read_bytes() == b"good"
    assert [found.key for found in store.list()] == ["db/latest.dump"]


def test_local_listing_skips_partial_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("db/a.dump", write(tmp_path / "src", b"a"))
    write(tmp_path / "store" / "db" / f"{PARTIAL_PREFIX}crashed", b"half")

    assert [found.key for found in store.list()] == ["db/a.dump"]


# Building stores and what importing them costs.


def test_store_from_builds_each_kind(tmp_path: Path) -> None:
    local = store_from("local", path=str(tmp_path))
    remote = store_from("s3", bucket="backups", prefix="db", endpoint_url="http://s3.test")

    assert isinstance(local, LocalStore) and local.root == tmp_path
    assert isinstance(remote, S3Store) and remote.prefix == "db/"
    assert remote.endpoint_url == "http://s3.test"


def test_store_from_refuses_bad_options() -> None:
    with pytest.raises(ConfigError, match="'ftp' is unknown"):
        store_from("ftp", path="/x")
    with pytest.raises(ConfigError, match="needs option 'bucket'"):
        store_from("s3", prefix="db")
    with pytest.raises(ConfigError, match="unknown option 'password'"):
        store_from("s3", bucket="backups", password="x")


def test_importing_leaves_boto3_unloaded(tmp_path: Path) -> None:
    probe = (
        "import json, sys; from pathlib import Path; from tasks.backupstore import store_from;"
        f"store_from('local', path={str(tmp_path)!r}).put('a', Path({__file__!r}));"
        "print(json.dumps(sorted(sys.modules)))"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )

    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "tasks.backupstore" in loaded
    heavy = {"boto3", "botocore", "pandas", "scipy"}
    assert [name for name in loaded if name.split(".")[0] in heavy] == []
