"""Benchmark: the repository cache against nginx `proxy_cache` + `proxy_cache_lock` as a
yum cache (the usual choice), with 8 concurrent cold `dnf` clients.

One upstream (tests/support/yum_upstream.py, paced to `--mbit` per connection like a remote
mirror) holds a CentOS-7-style repository built with rpmbuild + createrepo_c: `--big`
packages of `--mb` MB of incompressible payload plus small ones. In one run:

1. direct: `--clients` cold dnf installs of the package set straight from the upstream;
2. dnsoverride cache (mirror mode, `/packages/bench/...`), cold store;
3. nginx with proxy_cache_lock on (lock timeout default 5s), cold cache;

each as wall time for all clients and upstream bytes as a ratio of the package set's size
(1.00x: every package fetched once). Usage:

    python bench/packages/run.py [--clients 8] [--big 4] [--mb 24] [--mbit 200]

Needs dnf, rpmbuild, createrepo_c and nginx (Debian: nginx-light); the README's
benchmark section has the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.dnf_client import Client, dnf_env
from tests.support.ports import free_port
from tests.support.registry_peers import wait_for_port
from tests.support.yum_repos import Rpm, build_rpm, make_repo
from tests.support.yum_upstream import YumUpstream

TREE = "7.9.2009/os/x86_64"
HOST = "vault.centos.org"


def repo_file(base: str) -> str:
    return f"[base]\nname=bench\nbaseurl={base}\ngpgcheck=0\n"


def build(workdir: Path, big: int, megabytes: int) -> list[Rpm]:
    rpms = [build_rpm(workdir, f"bench-small-{i}", payload=40_000) for i in range(4)]
    rpms += [build_rpm(workdir, f"bench-big-{i}", payload=megabytes * 10**6) for i in range(big)]
    make_repo(workdir / "world" / HOST / TREE, rpms)
    return rpms


def cold_clients(workdir: Path, base: str, clients: int, names: list[str]) -> float:
    """Wall time of `clients` concurrent cold `dnf install` runs from `base`."""

    def one(index: int) -> None:
        client = Client(workdir / f"client-{index}", "7", {"bench.repo": repo_file(base)})
        result = subprocess.run(
            client.argv(*names),
            check=False,
            capture_output=True,
            text=True,
            env=dnf_env(),
            timeout=900,
        )
        if result.returncode != 0:
            raise RuntimeError(f"dnf failed from {base}:\n{result.stdout}{result.stderr}")
        installed = client.installed()
        missing = [name for name in names if not any(i.startswith(name + "-") for i in installed)]
        if missing:
            raise RuntimeError(f"not installed from {base}: {missing}")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return time.perf_counter() - started


def start_cache(workdir: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "storage": str(workdir / "cache-store"),
        "packages": {
            "upstreams": [
                {"name": "bench", "url": f"http://127.0.0.1:{upstream_port}/", "hosts": [HOST]}
            ]
        },
    }
    (workdir / "cache.yaml").write_text(json.dumps(config))
    log = (workdir / "cache.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dnsoverride", "cache", "--config", str(workdir / "cache.yaml"),
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port("127.0.0.1", port, proc=process)
    return process, port


NGINX_CONF = """\
user root;  # workers write the cache under the benchmark's own (root) temp dir
worker_processes 2;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=yum:10m max_size=10g inactive=30d
                     use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        proxy_cache yum;
        proxy_cache_lock on;
        proxy_cache_use_stale error timeout updating;
        proxy_cache_revalidate on;
        proxy_set_header Host {host};
        location ~ /repodata/repomd\\.xml$ {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_cache_valid 200 5m;
        }}
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_cache_valid 200 30d;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    directory = workdir / "nginx"
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream_port, host=HOST))
    process = subprocess.Popen(
        ["nginx", "-p", str(directory), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port("127.0.0.1", port, proc=process)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--big", type=int, default=4, help="big packages in the set")
    parser.add_argument("--mb", type=int, default=24, help="MB of payload per big package")
    parser.add_argument("--mbit", type=float, default=200, help="upstream Mbit/s per connection")
    args = parser.parse_args()
    for tool in ("dnf", "rpmbuild", "createrepo_c", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/packages: {tool} is not installed (see .ci/install-deps)")

    with tempfile.TemporaryDirectory(prefix="bench-packages-") as scratch:
        workdir = Path(scratch)
        rpms = build(workdir, args.big, args.mb)
        names = [rpm.name for rpm in rpms]
        set_size = sum(rpm.size for rpm in rpms)
        upstream = YumUpstream(workdir / "world")
        upstream.rate = args.mbit * 1e6 / 8
        # Direct clients reach it by address, the caches by the repository's host name.
        upstream.publish(f"127.0.0.1/{TREE}", workdir / "world" / HOST / TREE)
        upstream_port = free_port()
        upstream.start([("127.0.0.1", upstream_port, None)])
        print(
            f"package set: {len(rpms)} packages, {set_size / 1e6:.1f} MB; "
            f"{args.clients} concurrent cold dnf clients; upstream {args.mbit:g} Mbit/s "
            "per connection"
        )
        rows = []
        try:
            for label in ("direct", "dnsoverride cache", "nginx proxy_cache_lock"):
                upstream.requests.clear()
                process = None
                if label == "direct":
                    base = f"http://127.0.0.1:{upstream_port}/{TREE}/"
                elif label.startswith("dnsoverride"):
                    process, port = start_cache(workdir, upstream_port)
                    base = f"http://127.0.0.1:{port}/packages/bench/{TREE}/"
                else:
                    process, port = start_nginx(workdir, upstream_port)
                    base = f"http://127.0.0.1:{port}/{TREE}/"
                try:
                    took = cold_clients(workdir / label.split()[0], base, args.clients, names)
                finally:
                    if process is not None:
                        stop(process)
                rpm_bytes = upstream.sent_bytes(".rpm")
                rows.append((label, took, rpm_bytes / set_size, upstream.sent_bytes()))
        finally:
            upstream.stop()

    print()
    print(f"{'':24} {'wall s':>8} {'upstream .rpm bytes / set':>26} {'all upstream MB':>16}")
    for label, took, ratio, total in rows:
        print(f"{label:24} {took:8.1f} {ratio:25.2f}x {total / 1e6:16.1f}")
    direct = rows[0][1]
    for label, took, _, _ in rows[1:]:
        print(f"{label}: wall time {took / direct:.2f}x direct")


if __name__ == "__main__":
    main()
