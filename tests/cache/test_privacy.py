"""Private content stays private: real distribution registries with `auth: token` (a
private and a public repository) and `auth: htpasswd` (everything private) behind a cache
that holds credentials for them.

Anonymous clients pull public images and get 401 (with a Bearer challenge) for private
ones; private content is never served by digest under another repository name or through
another upstream (`?ns=`); clients with a grant pull private images (skopeo
`--src-creds`). Fails before the fix (issue 9): there was no `clients:` setting (the
cache refused the config), and without it anonymous pulls of private images succeeded
and private blobs were served under any repository name and through any upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from tests.support.registry_fixtures import StartCache
from tests.support.registry_liar import LyingRegistry, real_size_manifest
from tests.support.registry_peers import (
    OCI_MANIFEST,
    CacheProcess,
    Containerd,
    DistributionRegistry,
    Image,
    TestProxy,
    TokenServer,
    build_image,
    pull,
    push,
    verify_dir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
WARM_CLI = [sys.executable, "-m", "dnsoverride", "cache", "warm"]
DEV = {"Authorization": "Basic " + base64.b64encode(b"dev:devpw").decode()}


def htpasswd(path: Path, **users: str) -> Path:
    path.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(6)).decode()}\n"
            for user, pw in users.items()
        )
    )
    return path


def _hub(url: str, tmp_path: Path, **grant: list[str]) -> dict[str, Any]:
    """The cache's config: `url` as upstream hub.example, with the cache's credentials for
    it; client user dev (password devpw) granted `grant` (everything by default)."""
    return {
        "upstreams": [{"name": "hub.example", "url": url, "username": "ci", "password": "s3cret"}],
        "clients": {
            "htpasswd": str(htpasswd(tmp_path / "htpasswd", dev="devpw")),
            "grants": [{"users": ["dev"], **grant}],
        },
    }


@pytest.fixture
async def tokens(tmp_path: Path) -> AsyncIterator[TokenServer]:
    async with TokenServer(tmp_path / "tokens") as server:
        server.public = {"team/public"}
        yield server


async def _status(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, str, dict[str, str]]:
    async with http.get(url, **kwargs) as response:
        body = await response.read()
        message = ""
        if response.status >= 400 and body:
            message = json.loads(body)["errors"][0]["message"]
        return response.status, message, dict(response.headers)


async def _leaks(
    http: aiohttp.ClientSession, cache: CacheProcess, image: Image, paths: list[str]
) -> list[str]:
    """Which of `paths` (formatted with a private blob and manifest digest) answer 200."""
    blob = max(image.blobs, key=lambda digest: image.blobs[digest])
    leaked = []
    for template in paths:
        path = template.format(blob=blob, manifest=image.top_digest)
        status, _, _ = await _status(http, cache.url + path)
        if status == 200:
            leaked.append(path)
    return leaked


async def test_token_upstream_public_and_private_repositories(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        private = build_image(tmp_path / "private", platforms=("linux/amd64",))
        public = build_image(tmp_path / "public", platforms=("linux/amd64",))
        await push(private, f"{secured.address}/team/private:v1", creds="ci:s3cret")
        await push(public, f"{secured.address}/team/public:v1", creds="ci:s3cret")
        config = {
            "upstreams": [
                {"name": "hub.example", "url": secured.url, "username": "ci", "password": "s3cret"},
                # The same registry without credentials: a second way in, through ?ns=.
                {"name": "other.example", "url": secured.url},
            ],
            "clients": {
                "htpasswd": str(htpasswd(tmp_path / "htpasswd", dev="devpw", ops="opspw")),
                "grants": [{"users": ["dev"], "repositories": ["team/private"]}],
            },
        }
        cache = start_cache(config=config)

        # Anonymous: the public image pulls (fetched with the cache's credentials) ...
        code, out = await pull(f"{cache.address}/team/public:v1", tmp_path / "pub")
        assert code == 0, out + cache.logs()
        assert verify_dir(tmp_path / "pub") == set(public.blobs)
        # ... the private one does not: 401 with the Bearer challenge of the cache's realm.
        code, out = await pull(f"{cache.address}/team/private:v1", tmp_path / "anon")
        assert code != 0 and "private: authenticate" in out
        status, _, headers = await _status(http, f"{cache.url}/v2/team/private/manifests/v1")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith(f'Bearer realm="{cache.url}/token"')
        status, _, _ = await _status(http, f"{cache.url}/v2/team/private/tags/list")
        assert status == 401

        # With credentials and a grant it pulls; a user without a grant gets 401.
        code, out = await pull(
            f"{cache.address}/team/private:v1", tmp_path / "dev", creds="dev:devpw"
        )
        assert code == 0, out + cache.logs()
        assert verify_dir(tmp_path / "dev") == set(private.blobs)
        assert set(private.blobs) <= cache.stored_blobs()
        code, out = await pull(
            f"{cache.address}/team/private:v1", tmp_path / "ops", creds="ops:opspw"
        )
        assert code != 0
        code, out = await pull(
            f"{cache.address}/team/private:v1", tmp_path / "bad", creds="dev:nope"
        )
        assert code != 0 and "invalid password" in out
        # Credentials not for the cache (a job's own Docker Hub login): an anonymous client.
        code, out = await pull(
            f"{cache.address}/team/public:v1", tmp_path / "stranger", creds="stranger:hub-pat"
        )
        assert code == 0, out

        # Now stored, the private content is not served under another repository or
        # through another upstream: those requests go to that upstream, which decides.
        leaks = await _leaks(
            http,
            cache,
            private,
            [
                "/v2/team/public/blobs/{blob}",
                "/v2/team/public/manifests/{manifest}",
                "/v2/team/private/blobs/{blob}?ns=other.example",
                "/v2/team/private/manifests/{manifest}?ns=other.example",
                "/v2/team/private/blobs/{blob}",
            ],
        )
        assert leaks == []
        status, _, _ = await _status(
            http, f"{cache.url}/v2/team/private/manifests/{private.top_digest}", headers=DEV
        )
        assert status == 200
        # Public content stays shared: anonymous by digest, from the store.
        public_blob = next(iter(public.blobs))
        status, _, _ = await _status(http, f"{cache.url}/v2/team/public/blobs/{public_blob}")
        assert status == 200
    assert cache.stop() == 0
    checks = [line for line in cache.logs().splitlines() if '"visibility_checked"' in line]
    assert {(json.loads(line)["name"], json.loads(line)["public"]) for line in checks} == {
        ("team/public", True),
        ("team/private", False),
    }
    assert len(checks) == 2  # remembered for visibility_ttl: one anonymous HEAD each


async def test_htpasswd_upstream_is_private_throughout(
    tmp_path: Path, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    users = htpasswd(tmp_path / "upstream.htpasswd", ci="s3cret")
    auth = {"auth": {"htpasswd": {"realm": "test", "path": str(users)}}}
    with DistributionRegistry(tmp_path / "basic", auth) as basic:
        image = build_image(tmp_path / "image", platforms=("linux/amd64",))
        await push(image, f"{basic.address}/team/app:v1", creds="ci:s3cret")
        config = {
            "upstreams": [
                {"name": "basic.example", "url": basic.url, "username": "ci", "password": "s3cret"},
                {"name": "open.example", "url": basic.url},
            ],
            "clients": {
                "htpasswd": str(htpasswd(tmp_path / "clients.htpasswd", dev="devpw")),
                "grants": [{"users": ["dev"], "upstreams": ["basic.example"]}],
            },
        }
        cache = start_cache(config=config)
        code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "anon")
        assert code != 0 and "private: authenticate" in out
        code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "dev", creds="dev:devpw")
        assert code == 0, out + cache.logs()
        assert verify_dir(tmp_path / "dev") == set(image.blobs)
        leaks = await _leaks(
            http,
            cache,
            image,
            [
                "/v2/team/app/blobs/{blob}",
                "/v2/team/app/manifests/{manifest}",
                "/v2/team/other/blobs/{blob}",
                "/v2/team/app/blobs/{blob}?ns=open.example",
                "/v2/team/app/manifests/{manifest}?ns=open.example",
            ],
        )
        assert leaks == []
        status, _, _ = await _status(http, f"{cache.url}/v2/team/app/blobs/x?ns=open.example")
        assert status == 400  # checked before anything else


async def test_require_auth_closes_even_public_content(
    tmp_path: Path,
    upstream: DistributionRegistry,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(tmp_path / "image", platforms=("linux/amd64",), layer_sizes=(5000,))
    await push(image, f"{upstream.address}/team/app:v1")
    config = {
        "upstreams": [{"url": upstream.url}],
        "clients": {
            "htpasswd": str(htpasswd(tmp_path / "clients.htpasswd", dev="devpw")),
            "grants": [{"users": ["dev"]}],
            "require_auth": True,
        },
    }
    cache = start_cache(config=config)
    status, _, headers = await _status(http, f"{cache.url}/v2/")
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "anon")
    assert code != 0
    code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "dev", creds="dev:devpw")
    assert code == 0, out + cache.logs()
    # The same verified header is not re-hashed with bcrypt on every request.
    for _ in range(20):
        status, _, _ = await _status(http, f"{cache.url}/v2/team/app/manifests/v1", headers=DEV)
        assert status == 200


async def test_by_digest_in_a_second_repository_asks_the_upstream_the_right_way(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache
) -> None:
    """The same OCI image in two private repositories and a public one: once pulled through
    one, pulls by digest through the others are confirmed with the upstream, and pass.
    Fails before the fix: that confirmation was a HEAD without an Accept header, which
    distribution answers 404 for OCI manifests and indexes, so such pulls failed with
    `manifest unknown`."""
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        single = build_image(tmp_path / "single", platforms=("linux/amd64",))
        multi = build_image(tmp_path / "multi")
        for repository in ("team/private", "team/private2", "team/public"):
            for image in (single, multi):
                await push(image, f"{secured.address}/{repository}:{image.tag}", creds="ci:s3cret")
        cache = start_cache(config=_hub(secured.url, tmp_path))
        for image in (single, multi):
            code, out = await pull(
                f"{cache.address}/team/private@{image.top_digest}",
                tmp_path / f"first{image.top_digest[7:15]}",
                all_platforms=True,
                creds="dev:devpw",
            )
            assert code == 0, out + cache.logs()
        for repository, creds in (("team/private2", "dev:devpw"), ("team/public", None)):
            for image in (single, multi):
                target = tmp_path / f"{repository.replace('/', '-')}{image.top_digest[7:15]}"
                code, out = await pull(
                    f"{cache.address}/{repository}@{image.top_digest}",
                    target,
                    all_platforms=True,
                    creds=creds,
                )
                assert code == 0, out + cache.logs()
                assert verify_dir(target) == set(image.blobs)


async def test_a_visibility_check_answered_404_is_only_that_requests_answer(
    tmp_path: Path, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Concurrent anonymous requests of one repository share one visibility check; when it
    was asked with a path the upstream does not have (404), that says nothing of the
    repository, so the others ask with their own. Fails before the fix: every request that
    joined the check got the first one's `manifest unknown: ci/app:nosuch`."""
    async with LyingRegistry() as liar:
        body, _ = real_size_manifest(6 << 10)
        liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
        liar.token = "ok"
        release = liar.hold["/manifests/nosuch"] = asyncio.Event()
        config = {"upstreams": [{"url": liar.url, "username": "ci", "password": "s3cret"}]}
        cache = start_cache(config=config)
        first = asyncio.ensure_future(http.get(f"{cache.url}/v2/ci/app/manifests/nosuch"))
        await liar.holding.wait()
        assert liar.requests[-1] == ("HEAD", "/v2/ci/app/manifests/nosuch")
        others = [
            asyncio.ensure_future(http.get(f"{cache.url}/v2/ci/app/manifests/v1")) for _ in range(5)
        ]
        # Nothing outside the cache shows a request waiting on the shared check: give the
        # five the time to reach it (loopback, milliseconds) before the check is answered.
        await asyncio.sleep(0.3)
        release.set()
        async with await first as response:
            assert response.status == 404
        for pending in others:
            async with await pending as response:
                assert response.status == 200, await response.text()
                assert await response.read() == body


async def test_content_of_a_repository_whose_public_verdict_expired_is_not_shared(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """A repository pulled while public, then made private: once its verdict is past
    `visibility_ttl`, its stored content is not served under another repository without
    asking the upstream. Fails before the fix: a public verdict counted for sharing however
    long ago it expired, so the now private blob was served under team/public."""
    tokens.public = {"team/public", "team/flip"}
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        flip = build_image(tmp_path / "flip", platforms=("linux/amd64",))
        public = build_image(tmp_path / "public", platforms=("linux/amd64",))
        await push(flip, f"{secured.address}/team/flip:v1", creds="ci:s3cret")
        await push(public, f"{secured.address}/team/public:v1", creds="ci:s3cret")
        ttl = 1.0
        config = _hub(secured.url, tmp_path)
        config["clients"]["visibility_ttl"] = ttl
        cache = start_cache(config=config)
        code, out = await pull(f"{cache.address}/team/flip:v1", tmp_path / "flip-pulled")
        assert code == 0, out + cache.logs()
        tokens.public.discard("team/flip")
        # The verdict expires on the cache's own clock; nothing to wait on but that.
        await asyncio.sleep(ttl + 0.1)
        status, _, _ = await _status(http, f"{cache.url}/v2/team/public/manifests/v1")
        assert status == 200  # team/public's verdict is fresh again: no check below
        blob = max(flip.blobs, key=lambda digest: flip.blobs[digest])
        status, message, _ = await _status(http, f"{cache.url}/v2/team/public/blobs/{blob}")
        assert status == 404, message


async def test_a_public_manifest_naming_a_private_blob_does_not_open_it(
    tmp_path: Path,
    tokens: TokenServer,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
) -> None:
    """Anyone who may push a public image may name any digest in it as a foreign
    (non-distributable) layer: a registry that takes those (Windows base layers, from
    mcr.microsoft.com) does not check that such a layer exists. Fails before the fix: every
    digest a fetched manifest listed was linked to its repository, so the bait manifest
    made the private layer servable, anonymously, from the store under team/public."""
    foreign = {"validation": {"manifests": {"urls": {"allow": [r"^https://mcr\.microsoft\.com/"]}}}}
    with DistributionRegistry(
        tmp_path / "secured", {**tokens.registry_auth(), **foreign}
    ) as secured:
        private = build_image(tmp_path / "private", platforms=("linux/amd64",))
        public = build_image(tmp_path / "public", platforms=("linux/amd64",))
        await push(private, f"{secured.address}/team/private:v1", creds="ci:s3cret")
        await push(public, f"{secured.address}/team/public:v1", creds="ci:s3cret")
        secret = max(private.blobs, key=lambda digest: private.blobs[digest])
        await _push_bait(secured, tokens, public, secret, private.blobs[secret])
        cache = start_cache(config=_hub(secured.url, tmp_path))
        code, out = await pull(
            f"{cache.address}/team/private:v1", tmp_path / "dev", creds="dev:devpw"
        )
        assert code == 0, out + cache.logs()
        status, _, _ = await _status(http, f"{cache.url}/v2/team/public/manifests/bait")
        assert status == 200
        status, message, _ = await _status(http, f"{cache.url}/v2/team/public/blobs/{secret}")
        assert status == 404, message
        # What the bait names of its own repository is still served.
        status, _, _ = await _status(http, f"{cache.url}/v2/team/public/manifests/v1")
        assert status == 200


async def _push_bait(
    registry: DistributionRegistry, tokens: TokenServer, image: Image, secret: str, size: int
) -> None:
    """Push team/public:bait: `image`'s config plus `secret` as a non-distributable layer."""
    manifest = json.loads(
        (image.layout / "blobs" / "sha256" / image.top_digest.split(":")[1]).read_bytes()
    )
    manifest["layers"] = [
        {
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": secret,
            "size": size,
            "urls": ["https://mcr.microsoft.com/v2/windows/blobs/" + secret],
        }
    ]
    query = {"scope": "repository:team/public:push,pull", "service": "test-registry"}
    login = {"Authorization": "Basic " + base64.b64encode(b"ci:s3cret").decode()}
    async with aiohttp.ClientSession() as session:
        async with session.get(tokens.realm, params=query, headers=login) as response:
            token = (await response.json())["token"]
        async with session.put(
            f"{registry.url}/v2/team/public/manifests/bait",
            data=json.dumps(manifest).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": OCI_MANIFEST},
        ) as response:
            assert response.status == 201, await response.text()


async def test_a_download_restarted_for_another_private_repository_is_not_joined(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """A blob in flight for a private repository is waited for, not joined, by a request
    under another repository. Fails before the fix: when that download failed, the waiters
    woke in turn and the first (granted for a second private repository) started a new one;
    the anonymous request for team/public, woken next, joined that one unconfirmed and was
    streamed the private blob (distribution has no such blob in team/public)."""
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        image = build_image(tmp_path / "image", platforms=("linux/amd64",), layer_sizes=(400_000,))
        public = build_image(tmp_path / "public", platforms=("linux/amd64",))
        for repository in ("team/private", "team/private2"):
            await push(image, f"{secured.address}/{repository}:v1", creds="ci:s3cret")
        await push(public, f"{secured.address}/team/public:v1", creds="ci:s3cret")
        async with TestProxy(secured.url) as proxy:
            cache = start_cache(config=_hub(proxy.url, tmp_path))
            status, _, _ = await _status(http, f"{cache.url}/v2/team/public/manifests/v1")
            assert status == 200  # team/public's verdict is fresh: no visibility check below
            blob = max(image.blobs, key=lambda digest: image.blobs[digest])
            proxy.throttle = 200_000  # bytes/s: a download takes 2 s
            first = await http.get(f"{cache.url}/v2/team/private/blobs/{blob}", headers=DEV)
            assert first.status == 200  # streaming: the download for team/private is under way
            second = asyncio.ensure_future(
                _status(http, f"{cache.url}/v2/team/private2/blobs/{blob}", headers=DEV)
            )
            await asyncio.sleep(0.3)  # nothing shows a request waiting: let it get there first
            anonymous = asyncio.ensure_future(
                _status(http, f"{cache.url}/v2/team/public/blobs/{blob}")
            )
            await asyncio.sleep(0.3)
            proxy.cut_after = 0  # the first download dies ...
            await proxy.cut_started.wait()
            proxy.cut_after = None  # ... the one the second request starts does not
            with pytest.raises(aiohttp.ClientPayloadError):
                await first.read()
            first.release()
            assert (await second)[0] == 200
            status, message, _ = await anonymous
            assert status == 404, message


async def _docker_inspect(reference: str, config_dir: Path) -> tuple[int, str]:
    """`docker manifest inspect`: docker's own registry client (the one `docker pull` uses:
    ping `/v2/`, answer its challenge, fetch the manifest), no daemon needed."""
    environment = {**os.environ, "DOCKER_CONFIG": str(config_dir)}
    proc = await asyncio.create_subprocess_exec(
        "docker", "manifest", "inspect", "--insecure", reference,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environment,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def _docker_login(config_dir: Path, registry: str, credentials: str) -> Path:
    """A docker config holding `user:password` for `registry`, as `docker login` writes it."""
    config_dir.mkdir(parents=True)
    auth = base64.b64encode(credentials.encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return config_dir


async def test_docker_and_containerd_pull_public_images_anonymously_private_ones_logged_in(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache
) -> None:
    """Fails before the fix: with users configured, `/v2/` answered a `Basic` challenge, and
    docker without credentials fails on one ('no basic auth credentials') — every anonymous
    docker pull failed, public images included. containerd with credentials fetches its
    token with an OAuth2 form POST, answered too (not a 405 and a retry)."""
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is not installed: run .ci/install-deps")
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        # Docker schema 2: docker 20.10's `manifest inspect` takes no OCI manifest.
        for repository in ("team/public", "team/private"):
            image = build_image(tmp_path / repository, platforms=("linux/amd64",))
            await push(
                image, f"{secured.address}/{repository}:v1", creds="ci:s3cret", docker_v2=True
            )
        config = _hub(secured.url, tmp_path, repositories=["team/private"])
        cache = start_cache(config=config)
        anonymous = tmp_path / "anonymous"
        code, out = await _docker_inspect(f"{cache.address}/team/public:v1", anonymous)
        assert code == 0, out + cache.logs()
        code, out = await _docker_inspect(f"{cache.address}/team/private:v1", anonymous)
        assert code != 0, out  # docker calls a 401 'no such manifest' (as Docker Hub's)
        assert cache.wait_log('"/v2/team/private/manifests/v1"', '"status": 401')
        dev = _docker_login(tmp_path / "dev", cache.address, "dev:devpw")
        for repository in ("team/private", "team/public"):
            code, out = await _docker_inspect(f"{cache.address}/{repository}:v1", dev)
            assert code == 0, out + cache.logs()
        wrong = _docker_login(tmp_path / "wrong", cache.address, "dev:nope")
        code, out = await _docker_inspect(f"{cache.address}/team/private:v1", wrong)
        assert code != 0, out

        with Containerd(tmp_path / "containerd") as containerd:
            code, out = await containerd.pull(f"{cache.address}/team/public:v1")
            assert code == 0, out + cache.logs()
            code, out = await containerd.pull(f"{cache.address}/team/private:v1")
            assert code != 0, out
            code, out = await containerd.pull(f"{cache.address}/team/private:v1", "dev:devpw")
            assert code == 0, out + cache.logs()
        posts = cache.wait_log('"method": "POST", "path": "/token"')
        assert posts and all('"status": 200' in line for line in posts), posts


async def test_a_warmed_private_image_stays_private(
    tmp_path: Path, tokens: TokenServer, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Issue 14: `cache warm` fetches a private image with the cache's credentials into the
    store ahead of any client; that must not make it anyone's: anonymous clients still get
    401 for its tag, its manifest and layers by digest, under its own name and another,
    and skopeo cannot pull it; a granted user pulls it from the store."""
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as secured:
        private = build_image(tmp_path / "private", platforms=("linux/amd64",))
        await push(private, f"{secured.address}/team/private:v1", creds="ci:s3cret")
        control = tmp_path / "cache.sock"
        config = {**_hub(secured.url, tmp_path, repositories=["team/private"])}
        config["control_socket"] = str(control)
        cache = start_cache(config=config)
        process = await asyncio.create_subprocess_exec(
            *WARM_CLI, "--admin", str(control), "team/private:v1", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0, out
        assert set(private.blobs) <= cache.stored_blobs()
        paths = [
            "/v2/team/private/manifests/v1",
            "/v2/team/private/manifests/{manifest}",
            "/v2/team/private/blobs/{blob}",
            "/v2/team/public/blobs/{blob}",
            "/v2/team/public/manifests/{manifest}",
        ]
        assert await _leaks(http, cache, private, paths) == []
        code, text = await pull(f"{cache.address}/team/private:v1", tmp_path / "anon")
        assert code != 0, text
        code, text = await pull(
            f"{cache.address}/team/private:v1", tmp_path / "dev", creds="dev:devpw"
        )
        assert code == 0, text + cache.logs()
        assert verify_dir(tmp_path / "dev") == set(private.blobs)
