"""Name/digest grammar, config parsing and the store's bookkeeping, without a network."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dnsoverride.errors import UserError
from dnsoverride.registry import config as registry_config
from dnsoverride.registry.config import Budget, parse_size
from dnsoverride.registry.errors import RegistryError
from dnsoverride.registry.names import parse_digest, parse_name, parse_tag
from dnsoverride.registry.store import Store, TagRecord


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
    assert parse_size("1000") == 1000
    with pytest.raises(UserError, match="invalid size"):
        parse_size("lots")


def _args(**values: object) -> argparse.Namespace:
    defaults = dict.fromkeys(
        ("config", "listen", "upstream", "storage", "max_size", "tls_cert", "tls_key", "metrics")
    )
    return argparse.Namespace(**{**defaults, **values})


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = registry_config.load(_args())
    assert (config.host, config.port) == ("127.0.0.1", 5000)
    assert config.storage == tmp_path / "dnsoverride" / "registry"
    assert config.default_upstream == "registry-1.docker.io"
    hub = config.upstream("registry-1.docker.io")
    assert hub.url == "https://registry-1.docker.io"
    assert hub.library_prefix and "docker.io" in hub.hosts
    assert config.budget is None


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
    config = registry_config.load(_args(config=str(path), listen="127.0.0.1:6000"))
    assert (config.host, config.port) == ("127.0.0.1", 6000)  # the flag wins
    assert config.budget == Budget(10 << 30)
    assert config.tag_ttl == 60
    assert [u.name for u in config.upstreams] == ["quay.io", "ghcr.io"]
    assert config.default_upstream == "ghcr.io"
    assert config.upstream("ghcr.io").username == "u"
    assert config.metrics is None
    assert registry_config.load(_args(metrics="127.0.0.1:9101")).metrics == ("127.0.0.1", 9101)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: nowhere\n", "invalid listen address"),
        ("upstreams: [{url: 'ftp://x'}]\n", "invalid upstream URL"),
        ("upstreams: [{url: 'https://a', colour: red}]\n", "unknown keys"),
        ("default_upstream: nope\n", "not an upstream"),
        ("max_size: huge\n", "invalid size"),
        ("bogus: 1\n", "unknown keys: bogus"),
        ("tag_ttl: soon\n", "seconds"),
        ("[1, 2\n", "invalid YAML"),
        ("metrics: nowhere\n", "invalid listen address"),
    ],
)
def test_bad_config_is_a_user_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        registry_config.load(_args(config=str(path)))


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
    assert result.stderr.startswith("dnsoverride: error: invalid size")
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
    record = TagRecord("sha256:" + "b" * 64, "application/vnd.oci.image.index.v1+json", 12.5)
    store.write_tag("registry-1.docker.io", "library/alpine", "3", record)
    store.write_tag("registry-1.docker.io", "library/alpine/3", "x", record)  # no clash
    assert store.read_tag("registry-1.docker.io", "library/alpine", "3") == record
    assert store.read_tag("registry-1.docker.io", "library/alpine", "4") is None
