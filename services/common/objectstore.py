"""Object store: where dataset snapshots, checkpoints and adapters live.

Two implementations behind one interface: a local folder (the embedded default)
and S3 through the `minio` client (MinIO or any S3). Both stream: large files
are never held in memory. Both publish atomically: a reader sees a whole object
or none (local: write to a temporary file, then rename; S3: a PUT or multipart
upload becomes visible only when complete). Keys are `/`-separated relative
paths; absolute keys, `..`, `.` and empty segments are refused, so a key can
never escape its store or its prefix.

Every S3 request has deadlines: a connect timeout, a read timeout (the longest
wait for the next bytes of a response) and a few retries with backoff, so an
endpoint that hangs fails a call in bounded time instead of blocking it.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from loraforge.services.common.errors import InvalidArgument, NotFound, Unavailable

CHUNK = 1024 * 1024
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 30.0
S3_RETRIES = 2
_INCOMING = ".incoming"  # local store's temporary folder; not a valid first key segment
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key (relative to the store it was listed from) and size."""

    key: str
    size: int


def validate_key(key: str, *, what: str = "key") -> str:
    """Returns `key` if it is a safe relative object key; raises InvalidArgument otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"object {what} is empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"object {what} is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidArgument(f"object {what} {key!r} must be a relative path with `/` separators")
    segments = key.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise InvalidArgument(
                f"object {what} {key!r} has an empty, `.` or `..` segment; keys cannot leave their prefix"
            )
    if segments[0] == _INCOMING:
        raise InvalidArgument(f"object {what} {key!r} uses the reserved name {_INCOMING!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is empty or a valid key, optionally ending in `/`."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") if prefix.endswith("/") else prefix, what="prefix")
    return prefix


class ObjectStore(abc.ABC):
    """Streaming, atomic object storage with safe keys."""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        """Stores the concatenated chunks under `key`, replacing any old object atomically."""

    @abc.abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yields the object's bytes in chunks. NotFound if it does not exist."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Returns the object's info. NotFound if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yields every object whose key starts with `prefix`, sorted by key."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Deletes the object; deleting a missing object is not an error."""

    # Conveniences built on the primitives above.

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self.put_stream(key, [data])

    def put_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        def read() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self.put_stream(key, read())

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def get_file(self, key: str, dest: str | os.PathLike[str]) -> ObjectInfo:
        """Downloads to `dest` atomically (temporary file in the same folder, then rename)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in self.iter_chunks(key):
                    fh.write(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key, size)

    def open(self, key: str) -> BinaryIO:
        """A read-only file-like object streaming the object."""
        return io.BufferedReader(_ChunkReader(self.iter_chunks(key)), buffer_size=CHUNK)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix` (which must be non-empty); returns how many."""
        if not prefix:
            raise InvalidArgument("refusing to delete with an empty prefix")
        count = 0
        for info in list(self.list(prefix)):
            self.delete(info.key)
            count += 1
        return count

    def scoped(self, prefix: str) -> ObjectStore:
        """A view of this store where every key lives under `prefix`."""
        return PrefixedObjectStore(self, prefix)


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class PrefixedObjectStore(ObjectStore):
    """Wraps a store so that all keys are relative to a fixed prefix."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        self._inner = inner
        self._prefix = validate_key(prefix.strip("/"), what="prefix") + "/"

    def _full(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        return ObjectInfo(key, self._inner.put_stream(self._full(key), chunks).size)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        return self._inner.iter_chunks(self._full(key), chunk_size)

    def stat(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, self._inner.stat(self._full(key)).size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        for info in self._inner.list(self._prefix + prefix):
            yield ObjectInfo(info.key[len(self._prefix) :], info.size)

    def delete(self, key: str) -> None:
        self._inner.delete(self._full(key))

    def __repr__(self) -> str:
        return f"{self._inner!r}/{self._prefix}"


class LocalObjectStore(ObjectStore):
    """Objects as files under a root folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        # Objects are training data and adapters: the folder is its owner's only, also one
        # made before this rule (the files in it are then out of others' reach).
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(PermissionError):
            if self.root.stat().st_mode & 0o077:
                self.root.chmod(0o700)
        (self.root / _INCOMING).mkdir(exist_ok=True, mode=0o700)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink pointing out
            raise InvalidArgument(f"object key {key!r} resolves outside the store")
        return path

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root / _INCOMING)
        size = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if path.is_dir():
                raise InvalidArgument(f"object key {key!r} names a folder of other objects")
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key, size)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} does not exist") from None

        def gen() -> Iterator[bytes]:
            with fh:
                while chunk := fh.read(chunk_size):
                    yield chunk

        return gen()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"object {key!r} does not exist")
        return ObjectInfo(key, path.stat().st_size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only the folder the prefix points into, then filter by the full prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != _INCOMING]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, (Path(dirpath) / name).stat().st_size))
        yield from sorted(found, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return
        # Remove folders left empty, up to the root.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class _IterReader(io.RawIOBase):
    """A file-like view of an iterable of byte chunks, for minio's streaming put."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.size += n
        return n


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket (MinIO or any S3), optionally under a key prefix."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str,
        secret_key: str,
        secure: bool = True,
        region: str | None = None,
        prefix: str = "",
        part_size: int = 16 * 1024 * 1024,
        connect_timeout: float = S3_CONNECT_TIMEOUT,
        read_timeout: float = S3_READ_TIMEOUT,
        retries: int = S3_RETRIES,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.prefix = (
            (validate_key(prefix.strip("/"), what="prefix") + "/") if prefix.strip("/") else ""
        )
        self.part_size = part_size
        self.endpoint = endpoint
        # minio's own client waits up to 5 minutes per read and retries 5 times.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except Exception as exc:  # connection refused, bad credentials, ...
            raise Unavailable(
                f"object store s3://{bucket} at {endpoint} is not reachable: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.endpoint!r}, {self.bucket!r}, prefix={self.prefix!r})"

    def _full(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        reader = _IterReader(chunks)
        self.client.put_object(
            self.bucket,
            self._full(key),
            cast(BinaryIO, reader),  # minio only calls read() on it
            length=-1,
            part_size=self.part_size,
        )
        return ObjectInfo(key, reader.size)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, self._full(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key!r} does not exist") from None
            raise

        def gen() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk_size)
            finally:
                response.close()
                response.release_conn()

        return gen()

    def stat(self, key: str) -> ObjectInfo:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(self.bucket, self._full(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                raise NotFound(f"object {key!r} does not exist") from None
            raise
        return ObjectInfo(key, int(st.size or 0))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        items = [
            ObjectInfo(obj.object_name[len(self.prefix) :], int(obj.size or 0))
            for obj in self.client.list_objects(
                self.bucket, prefix=self.prefix + prefix, recursive=True
            )
            if obj.object_name is not None and not obj.is_dir
        ]
        yield from sorted(items, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._full(key))


def open_object_store(url: str) -> ObjectStore:
    """Opens a store from a folder path, a `file://` URL or an `s3://bucket/prefix?...` URL.

    S3 query parameters: `endpoint` (host:port, default s3.amazonaws.com), `secure`
    (true/false, default true), `region`, and deadlines: `connect_timeout` and
    `read_timeout` in seconds (default 5 and 30), `retries` (default 2). Credentials come from
    `LORAFORGE_S3_ACCESS_KEY` / `LORAFORGE_S3_SECRET_KEY`, else `AWS_ACCESS_KEY_ID` /
    `AWS_SECRET_ACCESS_KEY`.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalObjectStore(parsed.path if parsed.scheme == "file" else url)
    if parsed.scheme != "s3":
        raise InvalidArgument(f"object store URL {url!r}: scheme must be file:// or s3://")
    if not parsed.netloc:
        raise InvalidArgument(f"object store URL {url!r} names no bucket (s3://BUCKET/prefix)")
    query = dict(urllib.parse.parse_qsl(parsed.query))

    def number(name: str, default: float) -> float:
        raw = query.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if value < 0:
            raise InvalidArgument(
                f"object store URL {url!r}: {name}={raw!r} must be a number of seconds "
                "(or of retries) of at least 0"
            )
        return value

    access = os.environ.get("LORAFORGE_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("LORAFORGE_S3_SECRET_KEY") or os.environ.get(
        "AWS_SECRET_ACCESS_KEY", ""
    )
    return S3ObjectStore(
        query.get("endpoint", "s3.amazonaws.com"),
        parsed.netloc,
        access_key=access,
        secret_key=secret,
        secure=query.get("secure", "true").lower() not in ("0", "false", "no"),
        region=query.get("region"),
        prefix=parsed.path.lstrip("/"),
        connect_timeout=number("connect_timeout", S3_CONNECT_TIMEOUT),
        read_timeout=number("read_timeout", S3_READ_TIMEOUT),
        retries=int(number("retries", S3_RETRIES)),
    )


def copy_tree_to_store(
    store: ObjectStore, folder: str | os.PathLike[str], prefix: str
) -> list[ObjectInfo]:
    """Uploads every file under `folder` to `prefix/<relative path>`; returns what was written."""
    folder = Path(folder)
    written = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        written.append(store.put_file(key, path))
    return written


def copy_store_to_tree(
    store: ObjectStore, prefix: str, folder: str | os.PathLike[str]
) -> list[ObjectInfo]:
    """Downloads every object under `prefix/` into `folder`, keeping relative paths."""
    folder = Path(folder)
    base = prefix.rstrip("/") + "/"
    got = []
    for info in store.list(base):
        got.append(store.get_file(info.key, folder / info.key[len(base) :]))
    return got
