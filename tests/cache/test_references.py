"""Image references as admins type them for `cache purge`/`warm` and the `warm:` list,
resolved against the configured upstreams as docker reads them."""

from __future__ import annotations

import pytest

from dnsoverride.cache.registry.config import UpstreamConfig
from dnsoverride.cache.registry.references import ImageRef, parse_image
from dnsoverride.cache.store import Digest

HUB = UpstreamConfig.from_url("https://registry-1.docker.io")
LOCAL = UpstreamConfig.from_url("http://127.0.0.1:5000")
UPSTREAMS = (HUB, LOCAL)
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine:3.20", ImageRef("registry-1.docker.io", "library/alpine", "3.20")),
        ("alpine", ImageRef("registry-1.docker.io", "library/alpine", "latest")),
        ("team/app:v1", ImageRef("registry-1.docker.io", "team/app", "v1")),
        ("docker.io/library/python", ImageRef("registry-1.docker.io", "library/python", "latest")),
        (
            f"index.docker.io/alpine@{DIGEST}",
            ImageRef("registry-1.docker.io", "library/alpine", None, Digest("sha256", "ab" * 32)),
        ),
        ("127.0.0.1:5000/team/app:v1", ImageRef("127.0.0.1:5000", "team/app", "v1")),
        ("127.0.0.1:5000/app", ImageRef("127.0.0.1:5000", "app", "latest")),  # no library/
    ],
)
def test_references_resolve_like_docker(text: str, expected: ImageRef) -> None:
    assert parse_image(text, UPSTREAMS, HUB.name) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("quay.io/org/app:1", "no upstream named 'quay.io' is configured"),
        ("localhost/app", "no upstream named 'localhost' is configured"),
        ("Team/App", "invalid repository name 'Team/App'"),
        ("team/app:-bad", "invalid tag '-bad'"),
        ("team/app@sha256:12", "invalid or unsupported digest 'sha256:12'"),
    ],
)
def test_bad_references_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^.*" + reason.replace("(", r"\(")):
        parse_image(text, UPSTREAMS, HUB.name)
