"""The package's dependency rules (docs/layout.md): `model/` imports nothing else of the
package, `data/` knows no model, engine or exporter, and nothing imports the CLI."""

import ast
from pathlib import Path

import retinanet

PACKAGE = Path(retinanet.__file__).parent
# room -> the rooms it may not import (a room is a subpackage, or a module at the top)
FORBIDDEN = {
    "model": None,  # None: every room but its own
    "data": {"model", "engine", "export", "analysis", "convert", "serve", "cli", "zoo"},
}


def layout_violations(package: Path) -> list[str]:
    """`file: room -> room (module)` for every import of `package` that breaks a rule."""
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        room = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _imported_modules(node, parts, package.name):
                target_room = target[0] if target else ""
                rule = FORBIDDEN.get(room, set())
                if target_room == "cli" or (target_room != room and (rule is None or target_room in rule)):
                    found.append(f"{path.relative_to(package)}: {room} -> {target_room} ({'.'.join(target)})")
    return found


def _imported_modules(node, parts: tuple[str, ...], name: str) -> list[list[str]]:
    """The package-relative module paths `node` imports (relative or absolute), else []."""
    if isinstance(node, ast.ImportFrom) and node.level > 0:
        base = list(parts[:-1])[: len(parts) - node.level]
        return [base + (node.module.split(".") if node.module else [])]
    modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
        [a.name for a in node.names] if isinstance(node, ast.Import) else []
    return [m.split(".")[1:] for m in modules if m.split(".")[0] == name]


def test_the_package_keeps_its_dependency_rules():
    assert layout_violations(PACKAGE) == []


def test_the_rule_check_finds_each_kind_of_violation(tmp_path):
    package = tmp_path / "pkg"
    for folder in ("model", "data", "engine"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "cli.py").write_text("")
    (package / "outputs.py").write_text("")
    (package / "model" / "head.py").write_text("from ..outputs import write_text\nfrom . import anchors\n")
    (package / "data" / "coco.py").write_text("import pkg.model.head\nfrom ..outputs import x\n")
    (package / "engine" / "run.py").write_text("from ..cli import main\nfrom ..model import head\n")
    assert layout_violations(package) == [
        "data/coco.py: data -> model (model.head)",
        "engine/run.py: engine -> cli (cli)",
        "model/head.py: model -> outputs (outputs)",
    ]
