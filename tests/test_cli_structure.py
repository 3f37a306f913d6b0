"""The CLI's shape: no import cycle between its modules, and one handler per parsed command.

The package's ``__init__`` imports ``main`` (the console script's entry), which fixes the order a running interpreter
imports the rest in; the import-graph test also sees imports inside functions, which hide a cycle from every import
order (as ``cli/main.py`` importing ``cli/commands.py`` lazily once did).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import airflow_provider_pgplakar.cli as cli_pkg

CLI_DIR = Path(cli_pkg.__file__).parent
PACKAGE = "airflow_provider_pgplakar.cli"
MODULES = sorted(p.stem for p in CLI_DIR.glob("*.py"))  # __init__, commands, main, output, parser, secrets


def _module(stem: str) -> str:
    return PACKAGE if stem == "__init__" else f"{PACKAGE}.{stem}"


def _cli_imports(stem: str) -> set[str]:
    """The cli modules that ``stem`` imports anywhere (top level or inside a function): a lazy import hides a cycle
    from an import test but not from a reader."""
    tree = ast.parse((CLI_DIR / f"{stem}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                targets = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith(PACKAGE + "."):
                targets = [node.module.removeprefix(PACKAGE + ".").split(".")[0]]
            else:
                continue
            found.update(t for t in targets if t in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix(PACKAGE + ".") for a in node.names
                         if a.name.removeprefix(PACKAGE + ".") in MODULES)
    found.discard(stem)
    return found


def test_cli_modules_import_each_other_without_a_cycle() -> None:
    assert {"commands", "main", "parser"} <= set(MODULES)
    graph = {m: _cli_imports(m) for m in MODULES if m != "__init__"}
    for m in graph:
        graph[m].discard("__init__")
    # depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "commands" not in graph["parser"] and "main" not in graph["commands"] | graph["parser"]


IMPORT_ALL_ORDERS = """
import importlib, sys
pkg, first, modules = sys.argv[1], sys.argv[2], sys.argv[3:]
tried = 0

def explore(prefix):
    # every order of the modules not yet loaded after importing prefix (a loaded module's import is a no-op, so
    # these are all the orders that differ)
    global tried
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]
    for m in prefix:
        importlib.import_module(m)
    tried += 1
    for m in [m for m in modules if m not in sys.modules]:
        explore(prefix + [m])

explore([first])
print("ok", tried)
"""


@pytest.mark.parametrize("first", MODULES)
def test_every_cli_module_imports_first_in_a_fresh_interpreter_in_every_order(first: str) -> None:
    """A fresh interpreter per first module; within it every order of the rest (cli modules reloaded each time)."""
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL_ORDERS, PACKAGE, _module(first), *map(_module, MODULES)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stderr


def test_every_parsed_command_has_a_handler_and_every_handler_a_command() -> None:
    from airflow_provider_pgplakar.cli.commands import COMMANDS
    from airflow_provider_pgplakar.cli.parser import build_parser, command_names

    parsed = command_names(build_parser())
    assert parsed and parsed == set(COMMANDS), (sorted(parsed - set(COMMANDS)), sorted(set(COMMANDS) - parsed))
    assert all(callable(h) for h in COMMANDS.values())
    assert len(set(COMMANDS.values())) == len(COMMANDS)  # no handler serves two commands by mistake


def test_a_store_named_without_at_is_explained_before_every_command() -> None:
    from airflow_provider_pgplakar.cli.parser import UsageError, build_parser, command_names, split_at

    names = command_names(build_parser())
    for name in sorted(names):
        with pytest.raises(UsageError, match=f"write `pgplakar at /srv/store {name} …`"):
            split_at(["/srv/store", name], names)
    assert split_at(["--json", "at", "/srv/store", "stats"], names) == ("/srv/store", ["--json", "stats"])


# -- what a command's start-up imports (its fixed cost) ----------------------------------------------------------------

MODULES_AFTER = """
import json, sys
from airflow_provider_pgplakar.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
# Never needed by the commands below: each costs tens of milliseconds of every run's start-up (pendulum alone ~20 ms,
# psycopg ~100 ms on the 2-core CI machine), so importing one of them here is a regression of the fixed cost.
NEVER = ("pendulum", "boto3", "botocore", "airflow", "argon2")
STORE = ("psycopg", "cryptography", "zstandard", "sqlite3", "blake3", "airflow_provider_pgplakar.store.repo")
MAINTENANCE = ("airflow_provider_pgplakar.store.check", "airflow_provider_pgplakar.store.prune",
               "airflow_provider_pgplakar.store.forget", "airflow_provider_pgplakar.store.files")


def _run_counting_imports(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """Run ``pgplakar argv`` in a fresh interpreter; its exit code and every module it imported."""
    r = subprocess.run([sys.executable, "-c", MODULES_AFTER, *argv], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.stdout.strip(), r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["code"], set(out["modules"])


def _imported(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in modules or any(m.startswith(n + ".") for m in modules)]


def test_help_imports_neither_the_store_nor_postgresql() -> None:
    code, modules = _run_counting_imports(["--help"])
    assert code == 0
    assert _imported(modules, NEVER + STORE + MAINTENANCE) == []


def test_ls_and_a_files_backup_import_only_what_they_use(tmp_path: Path) -> None:
    """With a raw key (no KDF): neither PostgreSQL's driver nor the maintenance commands' modules, nor pendulum."""
    from airflow_provider_pgplakar.store.repo import Store

    env = {**os.environ, "PGPLAKAR_KDF": "1,8192,1", "PGPLAKAR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PGPLAKAR_PASSPHRASE", None)
    with Store.create(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache") as st:
        env["PGPLAKAR_KEY"] = st.export_key()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    at = ["at", str(tmp_path / "store")]
    code, modules = _run_counting_imports([*at, "backup", str(src)], env)
    assert code == 0
    assert _imported(modules, NEVER + ("psycopg",) + MAINTENANCE[:3]) == []
    code, modules = _run_counting_imports([*at, "ls"], env)
    assert code == 0
    ls_never = ("psycopg", "airflow_provider_pgplakar.store.writer", *MAINTENANCE[:2], MAINTENANCE[3])
    assert _imported(modules, NEVER + ls_never) == []
    with Store.open(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache") as st:  # the backup is there
        (snap,) = st.snapshots()
        (rec,) = [r for r in st.records(snap) if r.path.endswith("a.txt")]
        with st.open_record(rec) as f:
            assert b"".join(f.iter_chunks()) == b"hello\n"
