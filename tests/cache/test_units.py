"""Name/digest grammar, config parsing and the store's bookkeeping, without a network."""

from __future__ import annotations

import email.utils
import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.config import CacheFlags
from dnsoverride.cache.registry import app as app_module
from dnsoverride.cache.registry import upstream as upstream_module
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.links import Links
from dnsoverride.cache.registry.names import parse_digest, parse_name, parse_tag
from dnsoverride.cache.registry.tags import TagRecord, Tags
from dnsoverride.cache.store import Budget, Store, StoreWriteError
from dnsoverride.common.errors import UserError
from dnsoverride.common.grammar import GrammarError, parse_size


@pytest.mark.parametrize(
    "name", ["alpine", "library/alpine", "a/b/c", "my-app", "my__app", "a.b_c-d", "x" * 255]
)
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Alpine", "a//b", "../etc", "a/../b", ".hidden", "a/", "/a", "a_", "a___b", "x" * 256],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_name(name)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)


def test_digests_and_tags() -> None:
    digest = parse_digest("sha256:" + "a" * 64)
    assert (digest.algorithm, digest.hex, str(digest)) == ("sha256", "a" * 64, "sha256:" + "a" * 64)
    assert parse_digest("sha512:" + "0" * 128).algorithm == "sha512"
    for bad in ("sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 32, "sha256:../" + "a" * 61):
        with pytest.raises(RegistryError, match="digest"):
            parse_digest(bad)
    assert parse_tag("v1.2_3-rc") == "v1.2_3-rc"
    for bad in (".hidden", "-x", "a" * 129, "a/b"):
        with pytest.raises(RegistryError):
            parse_tag(bad)


def test_sizes() -> None:
    assert parse_size("20G") == 20 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size("1000", unit_required=False) == 1000
    with pytest.raises(GrammarError, match="expected a size"):
        parse_size("lots")


def _args(config: str | None = None, **flags: str) -> tuple[Path | None, CacheFlags]:
    """The config path and the flags `cache_config.load` takes."""
    return (Path(config) if config else None), CacheFlags(**flags)


@pytest.mark.e2e
def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = cache_config.load(*_args())
    assert (config.host, config.port) == ("127.0.0.1", 5000)
    assert config.storage == tmp_path / "dnsoverride" / "registry"
    assert config.registry.default_upstream == "registry-1.docker.io"
    hub = config.registry.upstream("registry-1.docker.io")
    assert hub.url == "https://registry-1.docker.io"
    assert hub.library_prefix and "docker.io" in hub.hosts
    assert config.budget is None


@pytest.mark.e2e
def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "listen: 0.0.0.0:5001\n"
        "max_size: 10G\n"
        "tag_ttl: 60\n"
        "upstreams:\n"
        "  - {url: 'https://quay.io'}\n"
        "  - {name: ghcr.io, url: 'https://ghcr.io', username: u, password: p}\n"
        "default_upstream: ghcr.io\n"
    )
    config = cache_config.load(*_args(config=str(path), listen="127.0.0.1:6000"))
    assert (config.host, config.port) == ("127.0.0.1", 6000)  # the flag wins
    assert config.budget == Budget(10 << 30)
    assert config.registry.tag_ttl == 60
    assert [u.name for u in config.registry.upstreams] == ["quay.io", "ghcr.io"]
    assert config.registry.default_upstream == "ghcr.io"
    assert config.registry.upstream("ghcr.io").username == "u"
    assert config.metrics is None
    assert cache_config.load(*_args(metrics="127.0.0.1:9101")).metrics == ("127.0.0.1", 9101)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: nowhere\n", "listen: 'nowhere' needs a port"),
        ("upstreams: [{url: 'ftp://x'}]\n", "invalid upstream URL"),
        ("upstreams: [{url: 'https://a', colour: red}]\n", "unknown key 'colour'"),
        ("default_upstream: nope\n", "not an upstream"),
        ("max_size: huge\n", "max_size: expected a size"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("tag_ttl: soon\n", "seconds"),
        ("[1, 2\n", "YAML syntax error"),
        ("metrics: nowhere\n", "metrics: 'nowhere' needs a port"),
    ],
)
def test_bad_config_is_a_user_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        cache_config.load(*_args(config=str(path)))


@pytest.mark.e2e
def test_cli_reports_bad_config_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text("max_size: huge\n")
    result = subprocess.run(
        [sys.executable, "-m", "dnsoverride", "registry", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    # One line per problem, each naming file:line and key.
    assert result.stderr.startswith(f"dnsoverride: error: {path}:1: max_size: expected a size")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def _put(store: Store, data: bytes) -> str:
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    store.put_bytes("blobs", digest, data)
    return str(digest)


def test_store_open_removes_temp_files_and_indexes_content(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    digest = _put(store, b"hello")
    (tmp_path / "tmp" / "dl-leftover").write_bytes(b"partial")
    reopened = Store(tmp_path)
    reopened.open()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert reopened.stats.temp_removed == 1
    assert reopened.stats.size == 5
    path = reopened.lookup("blobs", parse_digest(digest))
    assert path is not None and path.read_bytes() == b"hello"
    assert path == tmp_path / "blobs" / "sha256" / digest[7:9] / digest[7:]
    path.unlink()  # removed behind the store's back: forgotten, not served
    assert reopened.lookup("blobs", parse_digest(digest)) is None
    assert reopened.stats.size == 0


def test_store_evicts_lru_to_low_watermark_but_never_pinned(tmp_path: Path) -> None:
    store = Store(tmp_path, Budget(1000, high_watermark=0.9, low_watermark=0.5))
    store.open()
    first = _put(store, b"1" * 300)
    second = _put(store, b"2" * 300)
    store.lookup("blobs", parse_digest(first))  # first is now more recent than second
    with store.pinned("blobs", parse_digest(second)):
        third = _put(store, b"3" * 300)  # 900 > high (900 is not above): nothing yet
        assert store.stats.size == 900
        fourth = _put(store, b"4" * 300)  # 1200: evict LRU down to 500, skipping `second`
    assert store.lookup("blobs", parse_digest(second)) is not None
    assert store.lookup("blobs", parse_digest(first)) is None
    assert store.lookup("blobs", parse_digest(third)) is None
    assert store.lookup("blobs", parse_digest(fourth)) is not None
    assert store.stats.size == 600
    assert store.stats.evictions == 2


def test_store_files_follow_the_index(tmp_path: Path) -> None:
    """Eviction removes the file; flush_access stamps the access order on the files, so a
    reopened store evicts in the same LRU order."""
    store = Store(tmp_path)
    store.open()
    first, second = _put(store, b"a" * 10), _put(store, b"b" * 10)
    paths = {digest: store.path("blobs", parse_digest(digest)) for digest in (first, second)}
    for path in paths.values():
        os.utime(path, (1_000_000, 1_000_000))
    store.lookup("blobs", parse_digest(first))
    store.flush_access()
    assert paths[first].stat().st_mtime > paths[second].stat().st_mtime == 1_000_000
    reopened = Store(tmp_path, Budget(15, high_watermark=0.9, low_watermark=0.7))
    reopened.open()
    reopened.evict()
    assert not paths[second].exists()  # least recently used
    assert paths[first].exists()


def test_tag_records_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    tags = Tags(store)
    record = TagRecord("sha256:" + "b" * 64, "application/vnd.oci.image.index.v1+json", 12.5)
    tags.write("registry-1.docker.io", "library/alpine", "3", record)
    tags.write("registry-1.docker.io", "library/alpine/3", "x", record)  # no clash
    assert tags.read("registry-1.docker.io", "library/alpine", "3") == record
    assert tags.read("registry-1.docker.io", "library/alpine", "4") is None


def test_store_write_loops_over_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails before the fix: `put_bytes` ignored `os.write`'s count and committed the first
    piece under the whole content's digest."""
    store = Store(tmp_path)
    store.open()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    data = os.urandom(12_193)
    digest = _put(store, data)
    path = store.lookup("blobs", parse_digest(digest))
    assert path is not None and path.read_bytes() == data


def test_store_write_on_a_full_disk_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.open()
    real_write = os.write
    calls = []

    def full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:4096]))

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(Store, "free_bytes", lambda self: 4096)
    with pytest.raises(StoreWriteError, match="No space left on device") as caught:
        _put(store, os.urandom(12_193))
    assert caught.value.no_space
    assert "(4096 bytes free in" in caught.value.message
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.stats.entries == 0 and not list((tmp_path / "blobs").rglob("*/*/*"))
    reason = store.not_ready()
    assert reason is not None and "lack of space" in reason and "bytes free" in reason
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(Store, "free_bytes", lambda self: 1 << 30)
    assert store.not_ready() is None  # the failed write would fit now


def test_store_checks_sizes_at_commit_and_on_lookup(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    fd, temp = store.new_temp()
    Store.write_all(fd, b"x" * 100)
    Store.sync_close(fd)
    digest = parse_digest("sha256:" + hashlib.sha256(b"x" * 200).hexdigest())
    with pytest.raises(StoreWriteError, match="short write"):
        store.commit("blobs", digest, temp, 200)
    assert not temp.exists() and store.stats.entries == 0
    stored = parse_digest(_put(store, b"y" * 300))
    path = store.path("blobs", stored)
    path.write_bytes(b"y" * 10)  # damaged behind the store's back
    assert store.lookup("blobs", stored) is None
    assert not path.exists() and store.stats.corrupt_removed == 1


def _clients(tmp_path: Path, text: str, users: str = "") -> None:
    (tmp_path / "users").write_text(users)
    path = tmp_path / "registry.yaml"
    path.write_text(text.replace("USERS", str(tmp_path / "users")))
    cache_config.load(*_args(config=str(path)))


BCRYPT_LINE = "dev:$2b$06$" + "a" * 53 + "\n"


@pytest.mark.parametrize(
    ("text", "users", "message"),
    [
        ("clients: {htpasswd: USERS}\n", "dev:{SHA}abc\n", r"users:1: user 'dev': only bcrypt"),
        ("clients: {htpasswd: USERS}\n", "nocolon\n", "users:1: expected user:hash"),
        ("clients: {htpasswd: USERS}\n", BCRYPT_LINE * 2, "users:2: user 'dev' given twice"),
        ("clients: {grants: [{users: [eve]}]}\n", "", "user 'eve' is not in the htpasswd"),
        ("clients: {grants: [{networks: [10.0.0.0/33]}]}\n", "", "networks"),
        ("clients: {grants: [{repositories: ['a/*']}]}\n", "", "needs users or networks"),
        ("clients: {grants: [{networks: [10.0.0.0/8], upstreams: [x]}]}\n", "", "'x' is not"),
        ("clients: {require_auth: true}\n", "", "require_auth needs grants"),
        ("clients: {require_auth: 1}\n", "", "true or false"),
        ("clients: {visibility_ttl: soon}\n", "", "visibility_ttl: expected a number"),
        ("clients: {colour: red}\n", "", "clients: unknown key 'colour'"),
        ("clients: {htpasswd: /nonexistent/users}\n", "", "cannot read htpasswd"),
    ],
)
def test_bad_clients_config_is_a_clear_error(
    tmp_path: Path, text: str, users: str, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        _clients(tmp_path, text, users)


def test_clients_config_and_grants(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("# users\n\n" + BCRYPT_LINE)
    path = tmp_path / "registry.yaml"
    path.write_text(
        f"clients:\n  htpasswd: {tmp_path / 'users'}\n  visibility_ttl: 60\n  grants:\n"
        "    - {users: [dev], upstreams: [registry-1.docker.io], repositories: ['team/*']}\n"
        "    - {networks: ['10.1.0.0/16']}\n"
    )
    clients = cache_config.load(*_args(config=str(path))).registry.clients
    assert [user for user, _ in clients.users] == ["dev"]
    assert clients.visibility_ttl == 60 and not clients.require_auth
    first, second = clients.grants
    assert first.covers("registry-1.docker.io", "team/app")
    assert first.covers("registry-1.docker.io", "team/a/b")  # fnmatch: * takes slashes
    assert not first.covers("registry-1.docker.io", "other/app")
    assert not first.covers("quay.io", "team/app")
    assert second.covers("quay.io", "anything")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        ("0", 0.0),
        (None, None),
        ("soon", None),
        ("999999", 3600.0),
        ("-5", None),
        ("²", None),
        ("٣", None),
    ],
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert upstream_module._retry_after(value) == seconds


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    seconds = upstream_module._retry_after(when)
    assert seconds is not None and 115 < seconds <= 120


def test_links_persist_and_skip_torn_lines(tmp_path: Path) -> None:
    links = Links(tmp_path)
    blob = parse_digest("sha256:" + "a" * 64)
    manifest = parse_digest("sha256:" + "b" * 64)
    links.add(("hub", "team/app"), [("blobs", blob), ("manifests", manifest)])
    links.add(("hub", "team/app"), [("blobs", blob)])  # already there: not appended again
    path = tmp_path / "tags" / "hub" / "team" / "app" / "_links"
    assert path.read_text().count("\n") == 2
    with path.open("a") as stream:
        stream.write("blobs/sha256:cc")  # a crash mid-append
    reopened = Links(tmp_path)
    reopened.open()
    assert reopened.linked("blobs", blob, ("hub", "team/app"))
    assert reopened.owners("manifests", manifest) == {("hub", "team/app")}
    assert not reopened.linked("blobs", blob, ("hub", "team/other"))


@pytest.mark.parametrize(
    ("path", "push"),
    [
        ("team/app/blobs/uploads/", True),
        ("team/app/blobs/uploads/1f2e", True),
        ("team/app/blobs/uploads", True),
        ("team/uploads/manifests/v1", False),
        ("uploads/blobs/sha256:x", False),
        ("team/uploads/tags/list", False),
    ],
)
def test_only_blobs_uploads_is_the_push_api(path: str, push: bool) -> None:
    assert app_module._is_push(path.split("/")) is push
