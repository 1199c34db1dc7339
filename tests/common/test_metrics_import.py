"""The first scrape imports prometheus-client off the event loop's thread.

prometheus-client is imported on the first scrape (common/metrics.py), which took 40 ms
of CPU, 47-189 ms on a loaded box (measured with curl against `serve`: main's first
scrape 1-9 ms). Done on the loop's thread, that held every DNS query as long. Here a
fresh interpreter (prometheus-client not imported yet) runs the real admin listener on
uvloop, is scraped over TCP, and reports which thread imported the package and the
longest the loop went without running a 1 ms ticker. Before the fix (s18-rss at
0d4bd7e) the importing thread was MainThread; the loop's stall is printed, not asserted
(speed is for benchmarks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.ports import free_port

pytestmark = pytest.mark.e2e  # a fresh interpreter: prometheus-client not imported yet

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.abc, json, sys, threading, time
    import uvloop

    importers = []

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "prometheus_client":
                importers.append(threading.current_thread().name)
            return None

    sys.meta_path.insert(0, Watch())

    from dnsoverride.common.admin import start_admin
    from dnsoverride.common.metrics import Collectors

    class Up:
        def collect(self):
            from prometheus_client.core import GaugeMetricFamily

            yield GaugeMetricFamily("probe_up", "Up.", value=1)

    async def main():
        assert "prometheus_client" not in sys.modules
        port = int(sys.argv[1])
        registry = Collectors()
        registry.register(Up())
        admin = await start_admin("127.0.0.1", port, registry, lambda: True)
        gaps = []

        async def tick():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)
        replies = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            replies.append((await reader.read()).decode())
            writer.close()
        ticker.cancel()
        await admin.close()
        print(json.dumps({"importers": importers, "replies": replies, "stall": max(gaps)}))

    uvloop.run(main())
    """
)


def test_the_first_scrape_imports_prometheus_client_on_another_thread() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])  # after the log lines
    print(f"longest loop stall around the first scrape: {report['stall'] * 1000:.1f} ms")
    assert report["importers"]
    assert "MainThread" not in report["importers"], report["importers"]
    for reply in report["replies"]:
        assert reply.startswith("HTTP/1.1 200"), reply
        assert "probe_up 1.0" in reply
