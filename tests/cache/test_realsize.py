"""Cold pulls of real-size images through the cache from a real distribution registry:
20 images whose manifests are 5-60 KiB, every other one a 12-platform index, each pulled
cold by `skopeo copy` and by containerd (`ctr images pull`, unpacked), 0 failures.

Fails before the fix (issue 9): manifests of 4 KiB or more were read with one
`read(n)` that returns what has arrived; on the code before (main at d97161d) this test
counted 4 of 20 skopeo and 12 of 20 ctr pulls failing (502s and truncated manifests).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.support.registry_fixtures import StartCache
from tests.support.registry_peers import (
    CacheProcess,
    Containerd,
    DistributionRegistry,
    Image,
    build_image,
    pull,
    push,
    rss_kib,
    verify_dir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
IMAGES = 20
ARCHES = ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le", "loong64")
PLATFORMS = (
    *(f"linux/{arch}" for arch in ARCHES),
    "windows/amd64",
    "freebsd/amd64",
    "darwin/arm64",
)


async def _publish(tmp_path: Path, upstream: DistributionRegistry) -> list[Image]:
    images = []
    for number in range(IMAGES):
        manifest_size = (5 << 10) + number * (55 << 10) // (IMAGES - 1)  # 5 ... 60 KiB
        multi = number % 2 == 1
        image = build_image(
            tmp_path / f"layout{number}",
            layer_sizes=(30_000, 10_000),
            platforms=PLATFORMS if multi else ("linux/amd64",),
            manifest_size=manifest_size,
            index_size=manifest_size if multi else 0,
        )
        images.append(image)
    await asyncio.gather(
        *(push(image, f"{upstream.address}/ci/img{n}:v1") for n, image in enumerate(images))
    )
    return images


def _rss(cache: CacheProcess) -> str:
    assert cache.proc is not None
    now, peak = rss_kib(cache.proc.pid)
    return f"RSS {now / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB)"


async def test_twenty_cold_pulls_of_real_size_images_skopeo_and_containerd(
    tmp_path: Path, upstream: DistributionRegistry, start_cache: StartCache
) -> None:
    if shutil.which("ctr") is None:
        pytest.fail("containerd is not installed: run .ci/install-deps")
    images = await _publish(tmp_path, upstream)
    sizes = sorted(size for image in images for size in image.manifests.values())
    assert sizes[0] >= 5 << 10 and sizes[-1] >= 60 << 10

    # skopeo: every image cold, two at a time.
    cache = start_cache(upstream.url, storage=tmp_path / "skopeo-store")
    failures: dict[str, list[str]] = {"skopeo": [], "ctr": []}
    for first in range(0, IMAGES, 2):
        results = await asyncio.gather(
            *(
                pull(f"{cache.address}/ci/img{n}:v1", tmp_path / f"out{n}")
                for n in (first, first + 1)
            )
        )
        for n, (code, out) in zip((first, first + 1), results, strict=True):
            if code != 0:
                failures["skopeo"].append(f"img{n}: {out.strip()[-300:]}")
            else:
                assert verify_dir(tmp_path / f"out{n}") <= set(images[n].blobs)
    rss = {"skopeo": _rss(cache)}

    # containerd: the same images, cold through a second cache, pulled and unpacked.
    cache = start_cache(upstream.url, storage=tmp_path / "ctr-store")
    with Containerd(tmp_path / "ctr") as containerd:
        for n in range(IMAGES):
            code, out = await containerd.pull(f"{cache.address}/ci/img{n}:v1")
            if code != 0:
                failures["ctr"].append(f"img{n}: {out.strip()[-300:]}")
    rss["ctr"] = _rss(cache)
    for client, failed in failures.items():
        print(f"{client}: {IMAGES} cold pulls, {len(failed)} failures; cache {rss[client]}")
    assert failures == {"skopeo": [], "ctr": []}
