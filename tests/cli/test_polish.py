"""CLI polish: every subcommand's --help has a one-line description and examples, shell
completion generated from the parser (shtab) is a valid script that completes the real
subcommands and options, and the man page builds from the parser with the arguments the
RPM spec uses."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dnsoverride.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "packaging" / "rpm" / "dnsoverride.spec"


def subcommands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(subcommands(sub, f"{prefix}{name} "))
    return found


def test_every_subcommand_has_a_description_and_examples() -> None:
    commands = subcommands(build_parser())
    assert {
        "serve",
        "cache",
        "registry",
        "check",
        "status",
        "explain",
        "ca",
        "ca init",
        "ca issue",
    } <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        description = parser.description or ""
        assert description and "\n" not in description, name
        assert description in text
        examples = text.split("examples:\n", 1)[1].splitlines()
        assert examples and all(line.startswith(f"  dnsoverride {name}") for line in examples), (
            name,
            examples,
        )


@pytest.mark.e2e
def test_completion_scripts_are_generated_from_the_parser(tmp_path: Path) -> None:
    for shell in ("bash", "zsh"):
        result = subprocess.run(
            [sys.executable, "-m", "dnsoverride", "completion", shell],
            capture_output=True,
            text=True,
            check=True,
        )
        script = result.stdout
        words = ("cache", "status", "explain", "--cache-config", "--registry-config", "--live")
        for word in (*words, "--admin"):
            assert word in script, (shell, word)
        (tmp_path / shell).write_text(script)
    syntax = subprocess.run(
        ["bash", "-n", str(tmp_path / "bash")], capture_output=True, text=True, check=False
    )
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("zsh"):
        syntax = subprocess.run(
            ["zsh", "-n", str(tmp_path / "zsh")], capture_output=True, text=True, check=False
        )
        assert syntax.returncode == 0, syntax.stderr


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_subcommands_and_options(tmp_path: Path) -> None:
    """Source the generated script in a real bash and ask it, as the shell would on TAB."""
    script = subprocess.run(
        [sys.executable, "-m", "dnsoverride", "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "completion.bash").write_text(script)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        program = f"""
source {shlex.quote(str(tmp_path / "completion.bash"))}
COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={shlex.quote(line)}
COMP_POINT=${{#COMP_LINE}}
$(complete -p dnsoverride | sed 's/.*-F \\([^ ]*\\) .*/\\1/') dnsoverride
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
        result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
        return set(result.stdout.split())

    assert {"status", "explain", "serve"} <= complete("dnsoverride ")
    assert "--live" in complete("dnsoverride explain --l")
    assert complete("dnsoverride completion ") >= {"bash", "zsh"}


def _manpage_args() -> list[str]:
    match = re.search(r"^%global manpage_args (.+)$", SPEC.read_text(), re.MULTILINE)
    assert match
    text = match.group(1).replace("%{version}", "0.1.0").replace("%{url}", "https://example.org")
    return shlex.split(text)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("argparse-manpage") is None, reason="needs argparse-manpage")
def test_man_page_builds_from_the_parser_as_the_spec_builds_it(tmp_path: Path) -> None:
    args = _manpage_args()
    subprocess.run(["argparse-manpage", *args], cwd=tmp_path, check=True, capture_output=True)
    page = (tmp_path / "dnsoverride.1").read_text()
    for command in ("serve", "registry", "check", "status", "explain", "ca init", "completion"):
        assert f"'dnsoverride {command}'" in page, command
    assert "\\-\\-live" in page and "\\-\\-admin" in page
    if shutil.which("man"):
        rendered = subprocess.run(
            ["man", "-l", str(tmp_path / "dnsoverride.1")],
            capture_output=True,
            text=True,
            check=True,
            env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MAN_KEEP_FORMATTING": ""},
        ).stdout
        assert "Show how the DNS server answers a name, and why." in rendered
        # Every command's examples, from the top-level epilog (man justifies the lines).
        words = " ".join(rendered.split())
        assert "examples: dnsoverride serve --zones ./zones" in words
        assert "dnsoverride status --admin 127.0.0.1:9353 --admin 127.0.0.1:9354" in words
