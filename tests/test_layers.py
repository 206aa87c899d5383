"""The packages import one way: engine <- protocol <- server, client, router <- the CLI.

A module may import its own package and the layers below it, nothing above or beside
it; the router and the client never load torch. Checked on the source, so an upward
import inside a function (where a cycle hides) fails too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> (its folder, the packages of ours it may import besides itself)
LAYERS: dict[str, tuple[Path, set[str]]] = {
    "instgenie": (ROOT / "backend" / "instgenie", set()),
    "instgenie_protocol": (ROOT / "protocol" / "instgenie_protocol", {"instgenie"}),
    "instgenie_server": (ROOT / "server" / "instgenie_server", {"instgenie", "instgenie_protocol"}),
    "instgenie_client": (ROOT / "client" / "instgenie_client", {"instgenie_protocol"}),
    "instgenie_router": (ROOT / "router" / "instgenie_router", {"instgenie_protocol"}),
    "instgenie_cli": (
        ROOT / "cli" / "instgenie_cli",
        {"instgenie", "instgenie_protocol", "instgenie_server", "instgenie_client", "instgenie_router"},
    ),
    # The Triton adapters: thin layers over the server's helpers and the engine.
    "model_repository": (ROOT / "model_repository", {"instgenie", "instgenie_protocol", "instgenie_server"}),
}
OURS = {name for name in LAYERS if name != "model_repository"}


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in OURS)
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    folder, allowed = LAYERS[package]
    files = sorted(folder.rglob("*.py"))
    assert files, f"no sources under {folder}"
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported - allowed - {package})
        for path in files
        if (imported := _imported_packages(path)) - allowed - {package}
    }
    assert not wrong, f"{package} may import only {sorted(allowed)}; these import more: {wrong}"


def test_the_walk_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "engine_module.py"
    module.write_text("def f():\n    from instgenie_client import InstGenIEClient\n    import instgenie_router.cli\n")
    assert _imported_packages(module) == {"instgenie_client", "instgenie_router"}


def test_the_router_and_the_clients_load_no_torch() -> None:
    modules = [
        "instgenie_protocol",
        "instgenie_client",
        "instgenie_client.grpc_client",
        "instgenie_client.aio",
        "instgenie_client.http_client",
        "instgenie_client.cli",
        "instgenie_router",
        "instgenie_router.grpc_proxy",
        "instgenie_router.http_proxy",
        "instgenie_router.service",
        "instgenie_router.cli",
    ]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\nprint(heavy)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
