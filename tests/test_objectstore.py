"""One suite, two backends: the local folder and S3 (moto's S3-compatible server)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.services.common.errors import InvalidArgument, NotFound
from loraforge.services.common.objectstore import (
    LocalObjectStore,
    ObjectStore,
    copy_store_to_tree,
    copy_tree_to_store,
    open_object_store,
)
from tests.support import s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_object_store(str(tmp_path / "objects"))
    server = request.getfixturevalue("s3")
    return open_object_store(server.url(f"bucket-{os.urandom(4).hex()}", "root"))


def test_put_get_roundtrip_and_overwrite(store: ObjectStore) -> None:
    store.put_bytes("a/b/c.txt", b"hello")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    store.put_bytes("a/b/c.txt", b"world!")
    assert store.get_bytes("a/b/c.txt") == b"world!"
    assert store.stat("a/b/c.txt").size == 6


def test_streaming_put_and_get_of_a_large_object_keeps_every_byte(store: ObjectStore) -> None:
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for i in range(40):  # 40 MiB, crossing the S3 multipart threshold
            piece = bytes([i]) + block[1:]
            digest.update(piece)
            yield piece

    info = store.put_stream("big/blob.bin", chunks())
    assert info.size == 40 << 20
    got = hashlib.sha256()
    total = 0
    for chunk in store.iter_chunks("big/blob.bin"):
        assert len(chunk) <= 1 << 20
        got.update(chunk)
        total += len(chunk)
    assert total == 40 << 20
    assert got.hexdigest() == digest.hexdigest()


def test_list_by_prefix_is_sorted_and_scoped(store: ObjectStore) -> None:
    for key in ["x/2", "x/1", "x/sub/3", "xy/4", "z"]:
        store.put_bytes(key, key.encode())
    assert [i.key for i in store.list("x/")] == ["x/1", "x/2", "x/sub/3"]
    assert [i.key for i in store.list("x")] == ["x/1", "x/2", "x/sub/3", "xy/4"]
    assert [i.key for i in store.list()] == ["x/1", "x/2", "x/sub/3", "xy/4", "z"]
    assert list(store.list("nothing/")) == []


def test_delete_and_missing_objects(store: ObjectStore) -> None:
    store.put_bytes("d/1", b"1")
    store.put_bytes("d/2", b"2")
    store.delete("d/1")
    store.delete("d/1")  # idempotent
    assert not store.exists("d/1")
    with pytest.raises(NotFound):
        store.get_bytes("d/1")
    with pytest.raises(NotFound):
        store.stat("d/1")
    assert store.delete_prefix("d/") == 1
    assert list(store.list("d/")) == []


@pytest.mark.parametrize(
    "key",
    ["../escape", "/etc/passwd", "a/../../b", "a//b", "./a", "a/./b", "", "a\\b", ".incoming/x"],
)
def test_keys_that_could_escape_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidArgument):
        store.get_bytes(key)


def test_scoped_store_cannot_leave_its_prefix(store: ObjectStore) -> None:
    scoped = store.scoped("trainer")
    scoped.put_bytes("run/adapter.bin", b"w")
    assert store.get_bytes("trainer/run/adapter.bin") == b"w"
    assert [i.key for i in scoped.list("run/")] == ["run/adapter.bin"]
    with pytest.raises(InvalidArgument):
        scoped.put_bytes("../dataset/x", b"x")


def test_tree_copy_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "nested" / "w.bin").write_bytes(b"\x00" * 1000)
    written = copy_tree_to_store(store, src, "adapters/v1")
    assert sorted(i.key for i in written) == [
        "adapters/v1/adapter_config.json",
        "adapters/v1/nested/w.bin",
    ]
    dest = tmp_path / "dest"
    copy_store_to_tree(store, "adapters/v1", dest)
    assert (dest / "nested" / "w.bin").read_bytes() == b"\x00" * 1000
    assert (dest / "adapter_config.json").read_text() == "{}"


def test_reader_never_sees_a_half_written_object(store: ObjectStore) -> None:
    old = b"A" * (3 << 20)
    new = b"B" * (3 << 20)
    store.put_bytes("atomic", old)
    gate = threading.Event()

    def slow_chunks() -> Iterator[bytes]:
        yield new[: 1 << 20]
        gate.wait(5)
        yield new[1 << 20 :]

    writer = threading.Thread(target=store.put_stream, args=("atomic", slow_chunks()))
    writer.start()
    try:
        seen = store.get_bytes("atomic")  # while the writer is stuck half-way
        assert seen == old
    finally:
        gate.set()
        writer.join()
    assert store.get_bytes("atomic") == new


def test_local_store_refuses_a_symlink_pointing_outside(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "objects" / "link").symlink_to(outside)
    with pytest.raises(InvalidArgument):
        store.put_bytes("link/file", b"x")


def test_unknown_url_scheme_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument, match="file:// or s3://"):
        open_object_store("ftp://host/bucket")
