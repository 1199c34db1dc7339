"""The parse of a big zone set in worker processes, one per core."""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from dnsoverride.common.cpus import usable_cpus
from dnsoverride.common.interpreter import python_command
from dnsoverride.common.yamlsource import brief
from dnsoverride.dns.zones.parse import ParsedFile, Parts, parse_bytes, parse_file, parsed_file

log = structlog.get_logger(__name__)

# Below this many bytes of zone files to parse, this process parses them all: starting a
# worker process costs ~0.3 s, parsing a megabyte ~0.2 s.
PARALLEL_MIN_BYTES = 8 << 20


def parse_all(misses: list[tuple[Path, bytes]]) -> list[ParsedFile]:
    """Parse `misses` (path, bytes) in order. The parse is Python code (one core per
    process), so when there is enough to parse to pay for starting them, the files are
    shared out, biggest first, among worker processes, one per usable CPU (a cgroup CPU
    limit counts: more processes than it allows would only take turns)."""
    workers = min(len(misses), usable_cpus())
    if workers < 2 or sum(len(data) for _, data in misses) < PARALLEL_MIN_BYTES:
        return [parse_file(path, data) for path, data in misses]
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for index in sorted(range(len(misses)), key=lambda i: -len(misses[i][1])):
        least = loads.index(min(loads))
        shares[least].append(index)
        loads[least] += len(misses[index][1])
    with ThreadPoolExecutor(workers, thread_name_prefix="zone-parse") as threads:
        outcomes = list(threads.map(lambda share: _in_worker([misses[i] for i in share]), shares))
    parsed: dict[int, ParsedFile] = {}
    for share, outcome in zip(shares, outcomes, strict=True):
        for index, parts in zip(share, outcome, strict=True):
            parsed[index] = parsed_file(misses[index][0], parts)
    return [parsed[index] for index in range(len(misses))]


# A worker is a plain `python -c` process that reads its files from stdin and writes what
# it parsed to stdout, both pickled: not multiprocessing, whose spawn would re-import the
# program's main module (and fork is unsafe in a daemon with threads).
_WORKER = "from dnsoverride.dns.zones.workers import main; main()"


def _in_worker(jobs: list[tuple[Path, bytes]]) -> list[Parts]:
    """`parse_bytes` of each job in a worker process; in this one if that fails."""
    payload = pickle.dumps([(str(path), data) for path, data in jobs], pickle.HIGHEST_PROTOCOL)
    try:
        process = subprocess.run(
            # Our flags and sys.path: it imports this package from wherever this process
            # did (under -E or -I too, where PYTHONPATH is not read).
            python_command(_WORKER),
            input=payload,
            capture_output=True,
            check=False,
        )
        if process.returncode == 0:
            # Whatever else reached its stdout fails in any of pickle's many ways.
            results: list[Parts] = pickle.loads(process.stdout)
            if type(results) is list and len(results) == len(jobs):
                return results
            reason = f"exit status 0 without its results: {process.stdout[:60]!r}"
        else:
            reason = f"exit status {process.returncode}: {process.stderr.decode(errors='replace')}"
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
    log.warning("zone_parse_worker_failed", reason=brief(reason), files=len(jobs))
    return [parse_bytes(str(path), data) for path, data in jobs]


def main() -> None:
    """A parse worker's main (see `_WORKER`). The collector stays off: what it builds is
    acyclic, and collections would only walk it again and again."""
    gc.disable()
    jobs: list[tuple[str, bytes]] = pickle.load(sys.stdin.buffer)
    results = [parse_bytes(path, data) for path, data in jobs]
    pickle.dump(results, sys.stdout.buffer, pickle.HIGHEST_PROTOCOL)
