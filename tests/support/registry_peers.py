"""Real peers for the registry-cache tests and bench.

- `DistributionRegistry`: the distribution registry (`docker-registry serve`) on a random
  loopback port with filesystem storage in a temp dir; optionally `auth: token` or proxy
  mode (`proxy: remoteurl:`).
- `build_image`: an OCI image layout on disk, made here with tar+gzip layers, config
  JSON and manifests; several random layers, optionally a multi-arch index.
- `push` / `pull`: skopeo copying into a registry and out of one (verifying digests).
- `CacheProcess`: `dnsoverride registry` started as a real process.
- `TestProxy`: an HTTP proxy between the cache and the registry that counts the bytes
  the upstream sends, and on request throttles, cuts, corrupts or redirects blobs.
- `TokenServer`: a token realm issuing JWTs signed with a test key (RS256, `x5c`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from tests.support.ports import free_port

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not start listening")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Signal `proc` (unless it already exited), wait, kill it if it hangs; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- images -------------------------------------------------------------------------------
@dataclass
class Image:
    layout: Path
    tag: str
    top_digest: str  # index digest (multi-arch) or manifest digest
    # digest -> size of every blob (layers and configs) and every manifest
    blobs: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, int] = field(default_factory=dict)
    # platform "os/arch" -> its manifest digest
    platforms: dict[str, str] = field(default_factory=dict)

    @property
    def blob_bytes(self) -> int:
        return sum(self.blobs.values())


def _layer(size: int) -> tuple[bytes, str]:
    payload = os.urandom(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(f"data-{hashlib.sha1(payload[:64]).hexdigest()[:8]}.bin")
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), _sha256(tar_bytes)


def _padded(document: dict[str, Any], size: int) -> bytes:
    annotations: dict[str, str] = {}
    while len(json.dumps(document)) < size:
        annotations[f"org.example.build.step{len(annotations)}"] = os.urandom(48).hex()
        document["annotations"] = annotations
    return json.dumps(document).encode()


def build_image(
    directory: Path,
    tag: str = "v1",
    layer_sizes: tuple[int, ...] = (200_000, 150_000, 100_000),
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64"),
    manifest_size: int = 0,
    index_size: int = 0,
) -> Image:
    """Write an OCI layout; one manifest per platform, under an index when several.

    `manifest_size` / `index_size` pad the manifests / the index with annotations to at
    least that many bytes, as build tools' labels, provenance and attestation entries make
    real ones 5-60 KiB.
    """
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    image = Image(directory, tag, "")

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs_dir / digest.split(":")[1]).write_bytes(data)
        return digest

    descriptors: list[dict[str, Any]] = []
    for platform in platforms:
        os_name, arch = platform.split("/")
        layers, diff_ids = [], []
        for size in layer_sizes:
            blob, diff_id = _layer(size)
            digest = put(blob)
            image.blobs[digest] = len(blob)
            layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(blob)})
            diff_ids.append(diff_id)
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        config_digest = put(config)
        image.blobs[config_digest] = len(config)
        manifest = _padded(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": layers,
            },
            manifest_size,
        )
        manifest_digest = put(manifest)
        image.manifests[manifest_digest] = len(manifest)
        image.platforms[platform] = manifest_digest
        descriptors.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    if len(descriptors) > 1:
        index = _padded(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, index_size
        )
        top: dict[str, Any] = {"mediaType": OCI_INDEX, "digest": put(index), "size": len(index)}
        image.manifests[top["digest"]] = len(index)
    else:
        top = {k: v for k, v in descriptors[0].items() if k != "platform"}
    image.top_digest = str(top["digest"])
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return image


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(120):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


async def push(
    image: Image, target: str, creds: str | None = None, docker_v2: bool = False
) -> None:
    """skopeo copy the layout to `host:port/name:tag` (all platforms, digests preserved).

    `docker_v2` converts the manifest to Docker schema 2 (blob digests stay the same).
    """
    argv = ["skopeo", "copy", "-q", "--all", "--dest-tls-verify=false"]
    argv += ["--format", "v2s2"] if docker_v2 else ["--preserve-digests"]
    if creds:
        argv += ["--dest-creds", creds]
    code, out = await _run(*argv, f"oci:{image.layout}:{image.tag}", f"docker://{target}")
    if code != 0:
        raise RuntimeError(f"skopeo push failed: {out}")


async def pull(
    source: str, out_dir: Path, all_platforms: bool = False, creds: str | None = None
) -> tuple[int, str]:
    """skopeo copy `host:port/name:ref` into a dir: layout; returns (exit code, output)."""
    argv = ["skopeo", "copy", "-q", "--src-tls-verify=false"]
    if all_platforms:
        argv.append("--all")
    if creds:
        argv += ["--src-creds", creds]
    return await _run(*argv, f"docker://{source}", f"dir:{out_dir}")


def verify_dir(out_dir: Path) -> set[str]:
    """Check every blob skopeo wrote against its digest name; return the digests."""
    digests = set()
    for path in out_dir.iterdir():
        if path.name in ("manifest.json", "version") or path.name.endswith(".manifest.json"):
            continue
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == path.name, f"{path.name} has content {actual}"
        digests.add(f"sha256:{actual}")
    return digests


class _OnLoopback:
    """A server on 127.0.0.1:`port` that speaks plain HTTP."""

    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


# -- the distribution registry ------------------------------------------------------------
class _Daemon:
    """A peer process started by `start()` (which sets `proc` and `log`); a context manager."""

    proc: subprocess.Popen[bytes] | None
    log: IO[bytes]

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None
        with contextlib.suppress(AttributeError):
            self.log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class DistributionRegistry(_Daemon, _OnLoopback):
    """`docker-registry serve` on a random loopback port, storage in `root`."""

    def __init__(self, root: Path, extra: dict[str, Any] | None = None, port: int = 0) -> None:
        self.root = root
        self.port = port or free_port()
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": self.address, "secret": "test-secret"},
            **self.extra,
        }
        (self.root / "config.yml").write_text(json.dumps(config))
        self.log = (self.root / "registry.log").open("ab")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.root / "config.yml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        return self


# -- the cache as a process ---------------------------------------------------------------
class CacheProcess(_OnLoopback):
    """`dnsoverride registry` (or `cache`, the same daemon) as a real process on a random
    loopback port."""

    def __init__(
        self,
        storage: Path,
        upstream: str,
        *extra: str,
        config: dict[str, Any] | None = None,
        command: str = "registry",
        wrapper: Sequence[str] = (),
    ) -> None:
        self.command = command
        self.wrapper = tuple(wrapper)  # run under it (tests/support/modules_probe.py)
        self.storage = storage
        self.upstream = upstream
        self.extra = extra
        self.config = config
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # Beside the store, unless that is a mount of its own (a small tmpfs in a test).
        logs = storage.parent if not storage.parent.is_mount() else storage.parent.parent
        self.log_path = logs / f"cache-{self.port}.log"

    def start(self) -> CacheProcess:
        argv = [*self.wrapper, sys.executable, "-m", "dnsoverride", self.command]
        argv += ["--listen", self.address, "--storage", str(self.storage)]
        argv += ["--log-format", "json", *self.extra]
        if self.config is not None:
            path = self.log_path.with_suffix(".yaml")
            path.write_text(json.dumps(self.config))
            argv += ["--config", str(path)]
        else:
            argv += ["--upstream", self.upstream]
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = None if self.proc is None else stop_process(self.proc, sig)
        self.proc = None
        with contextlib.suppress(AttributeError):
            self.log.close()
        self.assert_clean_logs()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, *needles: str, timeout: float = 10.0) -> list[str]:
        """The log lines holding every one of `needles`, once there is at least one.

        The access log line of a request is written after its response has gone out, so
        a client can read the response before the line is there.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.logs().splitlines() if all(n in line for n in needles)]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def assert_clean_logs(self) -> None:
        """No traceback ever reached the log (every failure is handled), and nothing but
        structlog events did: a Python warning or a stray print is not a log line."""
        logs = self.logs()
        assert "Traceback" not in logs, logs
        for line in logs.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            assert isinstance(event, dict) and "event" in event, f"not a log event: {line!r}"

    def stored_blobs(self) -> set[str]:
        root = self.storage / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in root.glob("*/*")} if root.exists() else set()

    def temp_files(self) -> list[Path]:
        tmp = self.storage / "tmp"
        return list(tmp.iterdir()) if tmp.exists() else []


# -- a fault-injecting HTTP proxy ----------------------------------------------------------
_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade"}


class TestProxy:
    """HTTP reverse proxy in front of a registry, run in the test's event loop.

    Counts response body bytes by kind (blob/manifest/other) as sent by the upstream;
    can throttle blob bodies, cut them after N bytes, corrupt one byte of chosen blobs
    or manifests, or answer blob GETs with a 307 to a second listener ("CDN") on another
    loopback address. Records request headers for inspection.
    """

    __test__ = False

    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        self.target = target.rstrip("/")
        self.host = host
        self.port = free_port(host)
        self.bytes: Counter[str] = Counter()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.throttle: float | None = None  # bytes per second for blob bodies
        self.cut_after: int | None = None  # abort the connection after N blob bytes
        self.cut_started = asyncio.Event()
        self.corrupt: set[str] = set()  # blob digests, manifest digests or tags
        self.redirect_blobs_to: str | None = None
        self.fail_status: int | None = None  # answer every request with this status
        self.basic_auth: str | None = None  # "user:password" required, like an htpasswd registry
        self.extra_headers: dict[str, str] = {}  # added to every upstream answer
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> TestProxy:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.session is not None:
            await self.session.close()

    async def __aenter__(self) -> TestProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def blob_requests(self, method: str = "GET") -> list[str]:
        return [path for m, path, _ in self.requests if m == method and "/blobs/" in path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        path = request.path_qs
        self.requests.append((request.method, path, dict(request.headers)))
        kind = "blob" if "/blobs/" in path else "manifest" if "/manifests/" in path else "other"
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, headers={"ratelimit-remaining": "0"})
        if self.basic_auth is not None:
            expected = "Basic " + base64.b64encode(self.basic_auth.encode()).decode()
            if request.headers.get("Authorization") != expected:
                challenge = {"WWW-Authenticate": 'Basic realm="test"'}
                return web.Response(status=401, headers=challenge)
        if kind == "blob" and self.redirect_blobs_to and request.method == "GET":
            raise web.HTTPTemporaryRedirect(self.redirect_blobs_to + path)
        # A multidict: clients such as distribution's proxy send several Accept headers.
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        async with self.session.request(
            request.method, self.target + path, headers=headers, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, headers=self.extra_headers)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            reference = request.path.rsplit("/", 1)[-1]  # a blob's or manifest's digest or tag
            sent = 0
            flipped = False
            async for data in upstream.content.iter_chunked(16384):
                chunk = data
                if reference in self.corrupt and kind != "other" and not flipped:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    flipped = True
                if (
                    kind == "blob"
                    and self.cut_after is not None
                    and sent + len(chunk) > (self.cut_after)
                ):
                    await response.write(chunk[: self.cut_after - sent])
                    self.bytes[kind] += self.cut_after - sent
                    self.cut_started.set()
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if kind == "blob" and self.throttle:
                    await asyncio.sleep(len(chunk) / self.throttle)
                if sent + len(chunk) == upstream.content_length:
                    self.last_bytes(request)
                await response.write(chunk)
                sent += len(chunk)
                self.bytes[kind] += len(chunk)
            await response.write_eof()
            return response

    def last_bytes(self, request: web.Request) -> None:
        """Called just before the last bytes of a response go out: the client cannot have
        them (and act on them) yet."""


# -- a token server for `auth: token` --------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The realm of a token-auth distribution registry, with one user."""

    def __init__(self, root: Path, user: str = "ci", password: str = "s3cret") -> None:
        self.root = root
        self.user, self.password = user, password
        self.port = free_port()
        self.issued: list[str] = []  # scopes of issued tokens
        self.expires_in = 300  # seconds, as announced to the client
        self.refused = 0
        # Repositories anonymous clients may pull (as on Docker Hub: public images);
        # None: anonymous token requests are refused.
        self.public: set[str] | None = None
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = root / "token-signer.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": "test-registry",
                    "issuer": "test-issuer",
                    "rootcertbundle": str(self.bundle),
                }
            }
        }

    async def start(self) -> TokenServer:
        app = web.Application()
        app.router.add_get("/token", self.token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> TokenServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def token(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        anonymous = not auth and self.public is not None
        if auth != expected and not anonymous:
            self.refused += 1
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if anonymous and (self.public is None or name not in self.public):
                continue  # an anonymous token without access: the registry answers 401
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
            self.issued.append(scope if not anonymous else f"anonymous {scope}")
        now = int(time.time())
        claims = {
            "iss": "test-issuer",
            "sub": self.user,
            "aud": request.query.get("service", ""),
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": _b64(os.urandom(12)),
            "access": access,
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64(signature)}"
        return web.json_response({"token": token, "expires_in": self.expires_in})


# -- containerd ------------------------------------------------------------------------------
class Containerd(_Daemon):
    """`containerd` started by the test, with its own root, state and socket under `root`;
    `pull` runs `ctr images pull` (unpacked with the native snapshotter) against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "c.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\n'
            f'state = "{self.root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        self.log = (self.root / "containerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited: {(self.root / 'containerd.log').read_text()}"
                )
            version = subprocess.run(
                ["ctr", "-a", str(self.socket), "version"], capture_output=True, check=False
            )
            if version.returncode == 0:
                return self
            time.sleep(0.1)
        raise TimeoutError("containerd did not come up")

    async def pull(self, reference: str, user: str | None = None) -> tuple[int, str]:
        argv = ["ctr", "-a", str(self.socket), "-n", "test", "images", "pull", "--plain-http"]
        argv += ["--snapshotter", "native"]
        if user:
            argv += ["--user", user]
        return await _run(*argv, reference)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process `pid` in KiB: its resident memory now and at its peak."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
