"""The two packages are layers: `actors/` is the library and never imports `supervisor/`, and a
one-shot command loads only what it uses (trio keeps `trio._core` standing alone the same way)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from actors.layout import Layout

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_actors_imports_nothing_from_supervisor() -> None:
    modules = sorted((ROOT / "actors").rglob("*.py"))
    assert len(modules) > 10  # the walk sees the package
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in modules
        for line, module in _imported_modules(path)
        if module == "supervisor" or module.startswith("supervisor.")
    ]
    assert wrong == []


def test_the_import_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from supervisor.app import run_daemon\n")
    assert (2, "supervisor.app") in _imported_modules(module)


def _loaded_after(statement: str) -> set[str]:
    """The dlkeeper, libtorrent and rich modules a fresh interpreter holds after `statement`."""
    probe = (
        f"{statement}\nimport sys\n"
        "print('\\n'.join(m for m in sys.modules"
        " if m.split('.')[0] in {'actors', 'supervisor', 'libtorrent', 'rich'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(result.stdout.split())


def test_the_bots_client_loads_only_the_wire_models_and_the_errors() -> None:
    loaded = _loaded_after("import supervisor.client")
    assert loaded == {
        "supervisor",
        "supervisor.client",
        "actors",
        "actors.errors",
        "actors.messages",
        "actors.messages.base",
        "actors.messages.wire",
    }


@pytest.mark.parametrize(
    "statement",
    [
        "from supervisor.cli import main",
        "import supervisor.commands",
        "import supervisor.state_cli",
    ],
)
def test_one_shot_commands_load_neither_the_daemon_nor_libtorrent(statement: str) -> None:
    loaded = _loaded_after(statement)
    daemon = {"supervisor.app", "supervisor.api", "supervisor.server", "actors.session"}
    assert loaded & daemon == set()
    assert "libtorrent" not in loaded
    assert not any(module.startswith("actors.session") for module in loaded)


def test_the_layout_is_the_contracts() -> None:
    # CONTRACT.md section 3, spelled out once: everything else asks actors.layout.
    layout = Layout(Path("/srv/media"), Path("/mnt/usb/downloads"))
    assert layout.state_file == Path("/srv/media/data/downloads.json")
    assert layout.torrent_path("a-1") == Path("/mnt/usb/downloads/torrents/a-1.torrent")
    assert layout.resume_path("a-1") == Path("/mnt/usb/downloads/torrents/a-1.fastresume")


def test_every_package_is_installed() -> None:
    # setuptools installs the packages it is told of, not their subpackages: a package left out
    # works in an editable install (the tests) and is missing from `pip install .` (the demo).
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("actors", "supervisor")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed
