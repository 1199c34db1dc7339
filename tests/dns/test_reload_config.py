"""Config file hot reload over real sockets: `allow`, `views` (their networks and their zone
files) take effect with the zones, within a second, without a restart; a broken config keeps
everything as it was; keys that need a restart say so; config and zones published
together (one ConfigMap-style `..data` swap) are never served mixed.

Clients are told apart by the source address they bind (127.0.0.1, .2, .3).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import pytest

from tests.support.edits import save, zone_text
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, events, running
from tests.support.ports import free_port
from tests.support.waits import RELOAD_DEADLINE, poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

CI = "127.0.0.2"
OTHER = "127.0.0.1"
OUTSIDER = "127.0.0.3"


def config_text(
    ci_clients: str = f"{CI}/32",
    ci_zones: str = "[ci]",
    allow: str = f"[{OTHER}/32, {CI}/32]",
    extra: str = "",
) -> str:
    return (
        f"allow: {allow}\n"
        "views:\n"
        "  - name: ci\n"
        f"    clients: [{ci_clients}]\n"
        f"    zones: {ci_zones}\n"
        "reload_interval: 0\n" + extra
    )


def seen(server: DnsPeer, name: str, source: str) -> str:
    """What a client at `source` gets for `name`: its address, or the rcode's name."""
    try:
        response = server.query(name, source=source, timeout=1)
    except dns.exception.Timeout:
        return "timeout"
    if response.rcode() != 0:
        return str(dns.rcode.to_text(response.rcode()))
    return " ".join(sorted(r.address for rrset in response.answer for r in rrset))


def becomes(server: DnsPeer, expected: dict[tuple[str, str], str]) -> float:
    """Seconds until every (name, source) is answered as expected (at most the deadline)."""

    def now() -> dict[tuple[str, str], str]:
        return {key: seen(server, *key) for key in expected}

    return poll(lambda: now() == expected, RELOAD_DEADLINE, f"{expected} (now {now()})")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    # Names not overridden in a client's view are NXDOMAIN upstream.
    with dnsmasq(tmp_path, "--address=/test/") as peer:
        yield peer


@pytest.fixture
def zones(tmp_path: Path) -> Path:
    directory = tmp_path / "zones"
    directory.mkdir()
    (directory / "ci.yaml").write_text(zone_text({"registry.test": "10.0.0.1"}))
    (directory / "other.yaml").write_text(zone_text({"other.test": "10.0.0.5"}))
    return directory


@pytest.fixture
def server(tmp_path: Path, zones: Path, upstream: DnsPeer) -> Iterator[DnsPeer]:
    with dnsoverride_serve(tmp_path, zones, [upstream.address], config=config_text()) as peer:
        # The ci view sees ci.yaml only; everyone else (the default view) sees every file.
        assert seen(peer, "other.test", CI) == "NXDOMAIN"
        assert seen(peer, "other.test", OTHER) == "10.0.0.5"
        assert seen(peer, "registry.test", CI) == "10.0.0.1"
        assert seen(peer, "other.test", OUTSIDER) == "REFUSED"
        yield peer


def config_of(server: DnsPeer, tmp_path: Path) -> Path:
    return tmp_path / f"dnsoverride-{server.port}.yaml"


def test_view_networks_change_without_restart(server: DnsPeer, tmp_path: Path) -> None:
    save(config_of(server, tmp_path), config_text(ci_clients=f"{OTHER}/32"))
    becomes(server, {("other.test", OTHER): "NXDOMAIN", ("other.test", CI): "10.0.0.5"})
    assert server.process.poll() is None
    assert not events(server, "config_change_needs_restart")
    [reloaded] = events(server, "zones_reloaded")
    assert reloaded["swapped"] is True


def test_view_zone_files_change_without_restart(server: DnsPeer, tmp_path: Path) -> None:
    save(config_of(server, tmp_path), config_text(ci_zones="[ci, other]"))
    becomes(server, {("other.test", CI): "10.0.0.5", ("registry.test", CI): "10.0.0.1"})
    save(config_of(server, tmp_path), config_text(ci_zones="[other]"))
    becomes(server, {("registry.test", CI): "NXDOMAIN", ("registry.test", OTHER): "10.0.0.1"})
    assert not events(server, "config_change_needs_restart")


def test_allow_change_without_restart(server: DnsPeer, tmp_path: Path) -> None:
    save(config_of(server, tmp_path), config_text(allow=f"[{OTHER}/32, {OUTSIDER}/32]"))
    becomes(
        server,
        {
            ("other.test", OUTSIDER): "10.0.0.5",  # newly allowed, default view
            ("registry.test", CI): "REFUSED",  # no longer allowed
            ("other.test", OTHER): "10.0.0.5",
        },
    )


def test_broken_config_keeps_config_and_zones(server: DnsPeer, tmp_path: Path, zones: Path) -> None:
    config = config_of(server, tmp_path)
    save(config, config_text(ci_clients=f"{OTHER}/32") + "bogus: 1\n")
    poll(lambda: bool(events(server, "zones_reload_failed")), RELOAD_DEADLINE, "failure")
    [problem] = events(server, "zone_problem")
    assert (problem["file"], problem["line"]) == (str(config), 7)
    assert "unknown key 'bogus'" in problem["reason"]
    # Nor is a zone edit made meanwhile served: the config and zones load as one.
    (zones / "other.yaml").write_text(zone_text({"other.test": "10.0.0.6"}))
    poll(lambda: len(events(server, "zones_reload_failed")) >= 2, RELOAD_DEADLINE, "failure")
    assert seen(server, "other.test", OTHER) == "10.0.0.5"
    assert seen(server, "other.test", CI) == "NXDOMAIN"
    # A view naming a zone file that does not exist is a broken config too.
    save(config, config_text(ci_zones="[ci, nope]"))
    poll(lambda: len(events(server, "zones_reload_failed")) >= 3, RELOAD_DEADLINE, "failure")
    assert "'nope'" in events(server, "zone_problem")[-1]["reason"]
    assert seen(server, "other.test", OTHER) == "10.0.0.5"
    # Fixed: the config and the zone edit both apply.
    save(config, config_text(ci_clients=f"{OTHER}/32"))
    becomes(server, {("other.test", OTHER): "NXDOMAIN", ("other.test", CI): "10.0.0.6"})


def test_listen_change_needs_restart_and_the_rest_applies(
    tmp_path: Path, zones: Path, upstream: DnsPeer
) -> None:
    # Not dnsoverride_serve: `listen` must come from the file, not from a flag.
    port = free_port()
    config = tmp_path / "serve.yaml"
    listen = f"listen: ['127.0.0.1:{port}']\nupstreams: ['{upstream.address}']\n"
    listen += f"zones: {zones}\n"
    config.write_text(config_text(extra=listen))
    command = [sys.executable, "-m", "dnsoverride", "serve", "--config", str(config)]
    command += ["--log-format", "json"]
    with running("dnsoverride", command, "127.0.0.1", port, tmp_path / "serve.log") as server:
        moved = listen.replace(str(port), str(free_port()))
        save(config, config_text(ci_clients=f"{OTHER}/32", extra=moved))
        becomes(server, {("other.test", OTHER): "NXDOMAIN", ("other.test", CI): "10.0.0.5"})
        # The default `workers`: a worker started after the save answers the new views
        # before the supervisor has reloaded (and said what needs a restart): wait for it.
        logged = functools.partial(events, server, "config_change_needs_restart")
        poll(lambda: bool(logged()), RELOAD_DEADLINE, "config_change_needs_restart")
        [warning] = logged()  # once: the supervisor's
        assert warning["keys"] == ["listen"]


def test_tuning_key_changes_need_restart_and_the_rest_applies(
    server: DnsPeer, tmp_path: Path
) -> None:
    tuned = "probe: {interval: 5}\ntcp: {idle_timeout: 3}\ncache: {stale_reuse: 1}\n"
    save(config_of(server, tmp_path), config_text(ci_clients=f"{OTHER}/32", extra=tuned))
    becomes(server, {("other.test", OTHER): "NXDOMAIN", ("other.test", CI): "10.0.0.5"})
    [warning] = events(server, "config_change_needs_restart")
    assert warning["keys"] == ["cache", "probe", "tcp"]


def test_added_view_without_restart(server: DnsPeer, tmp_path: Path) -> None:
    outsiders = "  - name: outsiders\n    clients: [127.0.0.3/32]\n    zones: [other]\n"
    text = config_text(allow=f"[{OTHER}/32, {CI}/32, {OUTSIDER}/32]")
    save(
        config_of(server, tmp_path), text.replace("reload_interval", outsiders + "reload_interval")
    )
    becomes(
        server,
        {
            ("other.test", OUTSIDER): "10.0.0.5",
            ("registry.test", OUTSIDER): "NXDOMAIN",  # only other.yaml in that view
            ("registry.test", CI): "10.0.0.1",
            ("other.test", CI): "NXDOMAIN",
        },
    )


# Config and zones swapped together: two views trade client networks while both zone
# files change, as one Kubernetes ConfigMap (config file and zones behind one `..data`).
SWAPS = 20
CLIENTS = (CI, OUTSIDER)  # 127.0.0.2 and 127.0.0.3


def generation_config(gen: int) -> str:
    alpha, beta = (CI, OUTSIDER) if gen % 2 == 0 else (OUTSIDER, CI)
    return (
        f"allow: [{OTHER}/32, {CI}/32, {OUTSIDER}/32]\n"
        "views:\n"
        f"  - {{name: alpha, clients: [{alpha}/32], zones: [a]}}\n"
        f"  - {{name: beta, clients: [{beta}/32], zones: [b]}}\n"
        "default_view: alpha\n"
        "reload_interval: 0\n"
    )


def expected_answer(gen: int, client: str) -> str:
    """What `client` must get in generation `gen`: its view's file of that generation."""
    in_alpha = (client == CI) == (gen % 2 == 0)
    return f"10.1.0.{gen}" if in_alpha else f"10.2.0.{gen}"


def publish(conf: Path, gen: int) -> None:
    """Write generation `gen` beside the others and switch `..data` to it in one rename."""
    data = conf / f"..gen_{gen}"
    (data / "zones").mkdir(parents=True)
    (data / "dnsoverride.yaml").write_text(generation_config(gen))
    (data / "zones" / "a.yaml").write_text(f"records:\n  swap.test: {{A: 10.1.0.{gen}}}\n")
    (data / "zones" / "b.yaml").write_text(f"records:\n  swap.test: {{A: 10.2.0.{gen}}}\n")
    link = conf / "..data.tmp"
    link.symlink_to(data.name)
    os.replace(link, conf / "..data")


@pytest.mark.timeout(120)
def test_config_and_zones_swapped_together_never_mix(tmp_path: Path, upstream: DnsPeer) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    publish(conf, 0)
    (conf / "dnsoverride.yaml").symlink_to("..data/dnsoverride.yaml")
    (conf / "zones").symlink_to("..data/zones")
    # Which generation each possible answer belongs to, per client.
    generation_of = {
        client: {expected_answer(gen, client): gen for gen in range(SWAPS + 1)}
        for client in CLIENTS
    }
    config = ["--config", str(conf / "dnsoverride.yaml")]
    with dnsoverride_serve(tmp_path, conf / "zones", [upstream.address], *config) as server:
        seen_by: dict[str, list[str]] = {client: [] for client in CLIENTS}
        stop = threading.Event()

        def ask(client: str) -> None:
            while not stop.is_set():
                seen_by[client].append(seen(server, "swap.test", client))

        threads = [threading.Thread(target=ask, args=(client,)) for client in CLIENTS]
        for thread in threads:
            thread.start()
        try:
            for gen in range(SWAPS + 1):
                if gen:
                    publish(conf, gen)
                # Both clients see this generation before the next one is published.

                def served(gen: int = gen) -> bool:
                    return all(
                        seen_by[c] and seen_by[c][-1] == expected_answer(gen, c) for c in CLIENTS
                    )

                poll(
                    served,
                    RELOAD_DEADLINE * 3,
                    f"generation {gen} served",
                )
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    for client, answers in seen_by.items():
        assert len(answers) > 5 * SWAPS, f"{client}: only {len(answers)} answers"
        wrong = [answer for answer in answers if answer not in generation_of[client]]
        assert not wrong, f"{client}: {len(wrong)} answers from no generation, e.g. {wrong[:5]}"
        generations = [generation_of[client][answer] for answer in answers]
        assert generations == sorted(generations), f"{client} went back to an older generation"
        assert set(generations) == set(range(SWAPS + 1))
