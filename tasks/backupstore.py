"""Where backups are kept: a local directory or an S3 bucket, behind one interface.

boto3 is imported when an S3 store first talks to S3, so processes that never back up do not
load it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from workers.errors import CaretakerError, ConfigError, TransientError

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Bytes read at a time when hashing or copying: memory stays bounded whatever the file size.
CHUNK_BYTES = 1 * MIB
# Bytes; S3's smallest part is 5 MiB and s3transfer raises the part size itself when a file
# would need more than S3's 10,000 parts.
DEFAULT_MULTIPART_BYTES = 64 * MIB
# S3 user metadata (sent as x-amz-meta-sha256) and the local file's extended attribute.
SHA256_METADATA = "sha256"
SHA256_XATTR = "user.caretaker.sha256"
# Temp files start with this; listings skip them and keys may not use it.
PARTIAL_PREFIX = ".caretaker-partial-"
PRIVATE_DIR_MODE = 0o700
# Error codes S3 uses for "slow down" or a passing fault: worth retrying.
RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class StoreError(CaretakerError):
    """A backup store refused or failed an operation."""


class StoreUnavailable(StoreError, TransientError):
    """The store could not be reached or asked to slow down; trying again may succeed."""


class ObjectNotFound(StoreError):
    """The key asked for is not in the store."""


@dataclass(frozen=True)
class StoredObject:
    """One object in a store; sha256 is None where the store cannot tell without reading it."""

    key: str
    size: int
    modified: datetime
    sha256: str | None = None


class BackupStore(ABC):
    """Where backups are kept. Keys are relative POSIX paths such as `db/2026-12-01.dump`.

    Errors on the store's side raise StoreError (ObjectNotFound, StoreUnavailable); errors on
    the local side (the source of `put`, the destination of `get`) raise OSError as they are.
    A key that is not a canonical relative path raises ValueError.
    """

    @abstractmethod
    def put(self, key: str, source: Path) -> StoredObject:
        """Store a local file under key, replacing any object there; the file must not change
        meanwhile. Returns what was stored, with the sha256 of the bytes read."""

    @abstractmethod
    def get(self, key: str, dest: Path) -> Path:
        """Download key to dest through a temp file renamed over it; ObjectNotFound if missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with prefix (a plain string prefix), in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; a key that is not there is fine."""

    @abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """The object under key, or None when there is none."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs and messages; never credentials."""


def check_key(key: str) -> str:
    """The key itself when it is a canonical relative POSIX path; ValueError otherwise."""
    if not key or "\0" in key:
        raise ValueError(f"backup key {key!r} is empty or holds a nul byte")
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"backup key {key!r} leaves the store (absolute or '..')")
    # Only canonical keys, so one name cannot reach the same object two ways.
    if str(path) != key or key == ".":
        raise ValueError(f"backup key {key!r} is not canonical (no '.', '//' or trailing '/')")
    if any(part.startswith(PARTIAL_PREFIX) for part in path.parts):
        raise ValueError(f"backup key {key!r} uses the reserved prefix {PARTIAL_PREFIX!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: any start of a key (`db/2026-`), but never one leaving the store."""
    if "\0" in prefix or prefix.startswith("/") or ".." in PurePosixPath(prefix).parts:
        raise ValueError(f"listing prefix {prefix!r} leaves the store or holds a nul byte")
    return prefix


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def _hashed_size(path: Path) -> tuple[str, int]:
    with path.open("rb") as source:
        return _copy_hashing(source, None)


def _copy_hashing(source: BinaryIO, target: BinaryIO | None) -> tuple[str, int]:
    """Copy source to target (if any) chunk by chunk; the sha256 and size of what was read."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK_BYTES):
        digest.update(chunk)
        if target is not None:
            target.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A private temp file beside dest, made durable and renamed over dest when the block
    ends cleanly; removed when it does not, so no half file ever carries dest's name."""
    fd, temp_name = tempfile.mkstemp(prefix=PARTIAL_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as temp:
            yield temp
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_dir(dest.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utc(moment: datetime | float) -> datetime:
    if isinstance(moment, datetime):
        return moment.astimezone(UTC)
    return datetime.fromtimestamp(moment, UTC)


class LocalStore(BackupStore):
    """Backups as files under a root directory, private to the owner (0o700 / 0o600).

    A write lands whole or not at all. The sha256 from `put` is kept in an extended attribute
    where the filesystem has them, so `stat` and `list` give it without reading the file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def describe(self) -> str:
        return f"local directory {self.root}"

    def put(self, key: str, source: Path) -> StoredObject:
        path = self._path(key)
        started = time.monotonic()

        with source.open("rb") as reader:
            try:
                self._make_dirs(path.parent)
                with _atomic_file(path) as temp:
                    sha256, size = _copy_hashing(reader, temp)
                    _set_sha256(temp.fileno(), sha256)
                stored = StoredObject(key, size, _utc(path.stat().st_mtime), sha256)
            except OSError as exc:
                raise StoreError(f"{self.describe()}: {exc} (put {key!r})") from exc

        duration_ms = (time.monotonic() - started) * 1000
        log.info(
            "backup stored key=%s size_bytes=%d duration_ms=%.0f store=%s",
            key,
            size,
            duration_ms,
            self.describe(),
        )
        return stored

    def get(self, key: str, dest: Path) -> Path:
        path = self._path(key)
        try:
            reader = path.open("rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"{self.describe()}: no object {key!r}") from exc
        except OSError as exc:
            raise StoreError(f"{self.describe()}: {exc} (get {key!r})") from exc

        with reader:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with _atomic_file(dest) as temp:
                shutil.copyfileobj(reader, temp, CHUNK_BYTES)
        return dest

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        start = self.root / check_prefix(prefix).rpartition("/")[0]
        for path, info in self._walk(start, prefix):
            key = path.relative_to(self.root).as_posix()
            yield StoredObject(key, info.st_size, _utc(info.st_mtime), _get_sha256(path))

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Emptied directories stay: removing one could race a put creating a file in it.
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StoreError(f"{self.describe()}: {exc} (delete {key!r})") from exc
        log.info("backup deleted key=%s store=%s", key, self.describe())

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.describe()}: {exc} (stat {key!r})") from exc
        if not S_ISREG(info.st_mode):
            return None
        return StoredObject(key, info.st_size, _utc(info.st_mtime), _get_sha256(path))

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # A symlink inside the root could still lead a well-formed key out of it.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"backup key {key!r} leads outside {self.root} through a symlink")
        return path

    def _make_dirs(self, directory: Path) -> None:
        """Create directory and its missing parents, each private to the owner."""
        if directory.is_dir():
            return
        self._make_dirs(directory.parent)
        # Another put may create the same directory at the same moment.
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR_MODE)

    def _walk(self, directory: Path, prefix: str) -> Iterator[tuple[Path, os.stat_result]]:
        """Regular files under directory whose key starts with prefix, in key order."""
        # A directory deleted meanwhile (by retention, say) simply has nothing left to list.
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=_sort_name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            key = Path(entry.path).relative_to(self.root).as_posix()
            if entry.name.startswith(PARTIAL_PREFIX):
                continue
            if entry.is_dir(follow_symlinks=False):
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(Path(entry.path), prefix)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield Path(entry.path), info


def _sort_name(entry: os.DirEntry[str]) -> str:
    # A directory sorts as "name/", where its keys sort among its siblings' keys.
    return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name


def _set_sha256(fd: int, sha256: str) -> None:
    try:
        os.setxattr(fd, SHA256_XATTR, sha256.encode())
    except OSError as exc:
        # Without user extended attributes the sha256 is just unknown later, not an error.
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def _get_sha256(path: Path) -> str | None:
    try:
        return os.getxattr(path, SHA256_XATTR).decode()
    except OSError:
        return None


class S3Store(BackupStore):
    """Backups as objects in an S3 bucket, or an S3-compatible service at endpoint_url.

    Credentials come from boto3's usual chain (environment, shared config files, instance
    roles), never from arguments. Objects live under `prefix/`. `put` hashes the file before
    uploading and keeps the sha256 in the object's metadata: `stat` returns it, while `list`
    gives sha256=None because S3 listings carry no metadata. Listings are in key order.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold_bytes: int = DEFAULT_MULTIPART_BYTES,
        multipart_chunk_bytes: int = DEFAULT_MULTIPART_BYTES,
    ) -> None:
        if not bucket:
            raise ValueError("s3 bucket name is empty")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_chunk_bytes = multipart_chunk_bytes
        self._client: S3Client | None = None

    def describe(self) -> str:
        where = f"s3 bucket {self.bucket!r}"
        if self.prefix:
            where += f" prefix {self.prefix!r}"
        return f"{where} at {_endpoint_label(self.endpoint_url, self.region)}"

    @property
    def client(self) -> S3Client:
        """The boto3 client, made on first use."""
        if self._client is None:
            import boto3

            session = boto3.session.Session()
            self._client = session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region
            )
        return self._client

    def put(self, key: str, source: Path) -> StoredObject:
        name = self._name(key)
        sha256, size = _hashed_size(source)
        started = time.monotonic()

        with self._errors("put", key):
            self.client.upload_file(
                str(source),
                self.bucket,
                name,
                ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
                Config=self._transfer_config(),
            )
            stored = self._stored(key, self.client.head_object(Bucket=self.bucket, Key=name))

        if stored.size != size:
            raise StoreError(
                f"{self.describe()}: {key!r} holds {stored.size} bytes, the source had {size}:"
                " it changed while uploading"
            )
        duration_ms = (time.monotonic() - started) * 1000
        log.info(
            "backup stored key=%s size_bytes=%d duration_ms=%.0f store=%s",
            key,
            size,
            duration_ms,
            self.describe(),
        )
        return stored

    def get(self, key: str, dest: Path) -> Path:
        name = self._name(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors("get", key), _atomic_file(dest) as temp:
            self.client.download_fileobj(self.bucket, name, temp, Config=self._transfer_config())
        return dest

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        full_prefix = self.prefix + check_prefix(prefix)
        with self._errors("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    # Folder markers made by consoles are not backups.
                    if key and not key.endswith("/"):
                        yield StoredObject(key, item["Size"], _utc(item["LastModified"]))

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        log.info("backup deleted key=%s store=%s", key, self.describe())

    def stat(self, key: str) -> StoredObject | None:
        name = self._name(key)
        try:
            with self._errors("stat", key):
                head = self.client.head_object(Bucket=self.bucket, Key=name)
        except ObjectNotFound:
            return None
        return self._stored(key, head)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _stored(self, key: str, head: HeadObjectOutputTypeDef) -> StoredObject:
        sha256 = head.get("Metadata", {}).get(SHA256_METADATA)
        return StoredObject(key, head["ContentLength"], _utc(head["LastModified"]), sha256)

    def _transfer_config(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold_bytes,
            multipart_chunksize=self.multipart_chunk_bytes,
        )

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3's exceptions into StoreError naming the bucket, endpoint and key."""
        from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, action, key) from exc
        except S3UploadFailedError as exc:
            # The managed upload wraps the service's answer; its code is what matters.
            if isinstance(exc.__context__, ClientError):
                raise self._client_error(exc.__context__, action, key) from exc
            raise StoreError(self._message(str(exc), action, key)) from exc
        except (BotoConnectionError, HTTPClientError, RetriesExceededError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(self._message(problem, action, key)) from exc
        except (BotoCoreError, Boto3Error) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise StoreError(self._message(problem, action, key)) from exc

    def _client_error(self, exc: ClientError, action: str, key: str) -> StoreError:
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # A HEAD has no body, so a 404 does not say whether the key or the bucket is missing.
        if code in NOT_FOUND_CODES:
            if not self._bucket_missing():
                return ObjectNotFound(f"{self.describe()}: no object {key!r}")
            code = "NoSuchBucket"
        if status >= 500 or code in RETRYABLE_CODES:
            return StoreUnavailable(self._message(code, action, key))
        return StoreError(self._message(code, action, key))

    def _message(self, problem: str, action: str, key: str) -> str:
        return f"{self.describe()}: {problem} ({action} {key!r})"

    def _bucket_missing(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return exc.response.get("Error", {}).get("Code") in {"404", "NoSuchBucket"}
        return False


def _endpoint_label(endpoint_url: str | None, region: str | None) -> str:
    """The endpoint without any user, password or query that a URL may carry."""
    if endpoint_url is None:
        return f"aws region {region}" if region else "aws (default region)"
    parts = urlsplit(endpoint_url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


STORE_OPTIONS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required options, optional options)
    "local": ({"path"}, set()),
    "s3": (
        {"bucket"},
        {"prefix", "endpoint_url", "region", "multipart_threshold_bytes", "multipart_chunk_bytes"},
    ),
}


def store_from(kind: str, **options: Any) -> BackupStore:
    """The store a configuration names: "local" takes path; "s3" takes bucket and optionally
    prefix, endpoint_url, region and the multipart sizes in bytes."""
    if kind not in STORE_OPTIONS:
        raise ConfigError([f"backup store kind {kind!r} is unknown; use 'local' or 's3'"])
    required, optional = STORE_OPTIONS[kind]
    problems = [f"backup store {kind!r} needs option {name!r}" for name in required - set(options)]
    problems += [
        f"backup store {kind!r} has unknown option {name!r}"
        for name in sorted(set(options) - required - optional)
    ]
    if problems:
        raise ConfigError(problems)

    if kind == "local":
        return LocalStore(Path(options["path"]))
    return S3Store(**options)
