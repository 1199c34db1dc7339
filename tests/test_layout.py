"""The tree is the architecture: the package's imports, read with `ast`, run only downward.

- `dnsoverride.common` (what both daemons share) imports nothing from `dns` or `cache`;
- `dnsoverride.dns` and `dnsoverride.cache` import nothing of each other;
- no module imports a package above it (a module of `dns/zones/` imports `dns/zones/`,
  `common/` and the DNS protocol constants, never `dns/resolver.py` or `cli.py`);
- imports sit at the top of a module, except the per-command ones in `cli.py` (so that
  `dnsoverride check` does not pay for the registry's imports and the reverse).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import dnsoverride

PACKAGE = Path(dnsoverride.__file__).parent
SHARED = "dnsoverride.common"
# Modules of a package that its subpackages may import: the DNS protocol constants, and
# what the cache's registry/ and packages/ both build on. Each imports only common/ and
# others of this set (test_shared_pieces_import_only_shared_pieces).
SHARED_DOWNWARD = {
    "dnsoverride.dns.constants",
    "dnsoverride.cache.accesslog",
    "dnsoverride.cache.app",
    "dnsoverride.cache.fetch",
    "dnsoverride.cache.health",
    "dnsoverride.cache.serving",
    "dnsoverride.cache.session",
    "dnsoverride.cache.store",
    "dnsoverride.cache.tls",
}
LAZY_IMPORTS_ALLOWED = {"dnsoverride.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path, name: str) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, whether at module level) of every import of the project."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_of(path, name).split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`
            # imports the module.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "dnsoverride" or target.startswith("dnsoverride."):
                yield target, node.lineno, id(node) in top_level


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def problems_of(name: str, path: Path, package: str) -> list[str]:
    """What is wrong with the imports of module `name` (in `package`), read from `path`."""
    found = []
    for target, line, top in imports(path, name):
        where = f"{path.name}:{line}: {name} imports {target}"
        if not top and name not in LAZY_IMPORTS_ALLOWED:
            found.append(f"{where}: an import inside a function (a lazy-import workaround?)")
        if within(name, SHARED) and not within(target, SHARED):
            found.append(f"{where}: common/ imports only common/")
        for one, other in (("dns", "cache"), ("cache", "dns")):
            if within(name, f"dnsoverride.{one}") and within(target, f"dnsoverride.{other}"):
                found.append(f"{where}: {one}/ and {other}/ import nothing of each other")
        if package == "dnsoverride":
            continue  # the top level (cli, ca, check) is above everything
        downward = within(target, package) and target != package
        if not (downward or within(target, SHARED) or target in SHARED_DOWNWARD):
            found.append(f"{where}: an import running back up, out of {package}")
    return found


def test_every_module_is_found() -> None:
    """The walk sees the whole package and its imports (a guard against checking nothing)."""
    assert {"dnsoverride.cli", "dnsoverride.common.errors", "dnsoverride.dns.zones.load"} <= set(
        MODULES
    )
    daemon = list(imports(MODULES["dnsoverride.dns.daemon"], "dnsoverride.dns.daemon"))
    assert ("dnsoverride.dns.resolver", True) in {(target, top) for target, _, top in daemon}


def test_imports_run_only_downward() -> None:
    found = [
        problem
        for name, path in MODULES.items()
        for problem in problems_of(name, path, package_of(path, name))
    ]
    assert found == []


def test_the_rules_catch_what_the_old_layout_did(tmp_path: Path) -> None:
    """Fed the old layout's imports (the zone loader's lazy import of the prober, the
    reloader's import of dns.views) and a common module importing dns, a cache module
    importing dns, each rule reports."""
    samples = {
        "dnsoverride.dns.zones.parse": "def f():\n    from dnsoverride.dns.health import Prober\n",
        "dnsoverride.common.reloader": "from dnsoverride.dns.views import Routing\n",
        "dnsoverride.cache.registry.app": "from dnsoverride.dns import wire\n",
    }
    reasons: list[str] = []
    for name, text in samples.items():
        path = tmp_path / f"{name.rpartition('.')[2]}.py"
        path.write_text(text)
        reasons.extend(
            problem.rpartition(": ")[2]
            for problem in problems_of(name, path, name.rpartition(".")[0])
        )
    assert sorted(reasons) == [
        "an import inside a function (a lazy-import workaround?)",
        "an import running back up, out of dnsoverride.cache.registry",
        "an import running back up, out of dnsoverride.common",
        "an import running back up, out of dnsoverride.dns.zones",
        "cache/ and dns/ import nothing of each other",
        "common/ imports only common/",
    ]


def test_dns_protocol_constants_are_named_once() -> None:
    """No module of dns/ names a protocol number again that dns/constants.py names (the
    old layout had OPT = 41 and COOKIE = 10 in wire.py beside QTYPE_OPT = 41 and
    EDNS_COOKIE = 10 in answer.py, and MAX_CNAME_CHAIN beside ca.py's CNAME_HOPS = 8)."""
    constants = ast.parse(MODULES["dnsoverride.dns.constants"].read_text())
    named = {
        target.id: ast.literal_eval(node.value)
        for node in constants.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert named["OPT"] == 41 and named["COOKIE"] == 10
    found = []
    for name, path in MODULES.items():
        if name == "dnsoverride.dns.constants" or not (
            within(name, "dnsoverride.dns") or name == "dnsoverride.ca"
        ):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                value = node.value.value
                for target in node.targets:
                    if not isinstance(target, ast.Name):
                        continue
                    again = target.id.lstrip("_") in named or any(
                        target.id.endswith(f"_{key}") and value == named[key] for key in named
                    )
                    if again:
                        found.append(f"{name}: {target.id} = {value!r}")
    assert found == []


def test_shared_pieces_import_only_shared_pieces() -> None:
    """What subpackages may import from above them stays below them: a shared module that
    imported registry/ (or cache/daemon.py) would let an import run back up through it."""
    found = [
        f"{name} imports {target}"
        for name in sorted(SHARED_DOWNWARD)
        for target, _, _ in imports(MODULES[name], name)
        if not (within(target, SHARED) or target in SHARED_DOWNWARD)
    ]
    assert found == []


TESTS = Path(__file__).parent


def test_test_modules_import_shared_code_one_way() -> None:
    """Tests mirror the package, and what they share lives in `tests/support/`, imported
    as `tests.support.*`: no test module imports another test module, and nothing is
    imported by a bare name that works only with `tests/` on `sys.path`."""
    local = {path.stem for path in TESTS.rglob("*.py")} - {"__init__", "conftest"}
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            where = f"{path.relative_to(TESTS)}:{node.lineno}"
            for name in names:
                first, _, rest = name.partition(".")
                if first == "tests" and rest and not rest.startswith("support"):
                    wrong.append(f"{where}: {name}")
                elif first in local:
                    wrong.append(f"{where}: bare {name}")
    assert wrong == []
    # Only the whole-tree check sits at the top; every other test is in its package's dir.
    top = {path.name for path in TESTS.glob("*.py")}
    assert top == {"__init__.py", "conftest.py", "test_layout.py"}
