"""Which way imports run (docs/design.md, "Architecture"): `pipeline/` (the library) never imports `stages/` (the
verbs); a stage never reaches into another stage's private (`_name`) symbols, and no module into a pipeline module's.

Read from the source with `ast`, not by importing it: every form counts (`import stages.x`, `from stages.x import
_y`, `from . import`, `stages.x._y` after an import, `getattr(module, "_y")`, importlib with a literal name), in
function bodies too. A failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("pipeline", "stages")  # packages at the repository's top level
SCRIPTS = "scripts"  # loose scripts: they use the library as anyone would


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


KNOWN = {module_name(p) for p in sources(*LAYERS)}  # every module of the two packages


def canonical(name: str) -> str:
    """A module name without the installed package's prefix (`ditpipe.pipeline.fid` is `pipeline.fid`)."""
    return name.removeprefix("ditpipe.")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer(module: str) -> str:
    return module.split(".", 1)[0]


class Use:
    """One module's imports and the private names it reaches in other modules, each with its line and source."""

    def __init__(self, path: Path):
        self.path, self.module = path, module_name(path) if path.parent.name in LAYERS else path.stem
        self.package = self.module if path.name == "__init__.py" else self.module.rpartition(".")[0]
        self.tree = ast.parse(path.read_text(), str(path))
        self.bound: dict[str, str] = {}  # local name -> the module it names
        self.imports: list[tuple[int, str, str]] = []  # (line, module, source)
        self.private: list[tuple[int, str, str, str]] = []  # (line, module, private name, source)
        nodes = sorted(ast.walk(self.tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
        for node in nodes:  # in source order, so a name is bound before it is used
            if isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node)
        for node in nodes:
            if isinstance(node, ast.Attribute):
                self._attribute(node)
            elif isinstance(node, ast.Call):
                self._call(node)
        self.imports.sort()
        self.private.sort()

    def where(self, line: int) -> str:
        return f"{self.path.relative_to(ROOT)}:{line}"

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = canonical(alias.name)
            self.imports.append((node.lineno, target, ast.unparse(node)))
            if alias.asname:
                self.bound[alias.asname] = target
            else:
                self.bound[target.split(".")[0]] = target.split(".")[0]

    def _import_from(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolved against this module's package
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1] if node.level > 1 else base
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = canonical(node.module or "")
        text = ast.unparse(node)
        self.imports.append((node.lineno, source, text))
        for alias in node.names:
            full = f"{source}.{alias.name}" if source else alias.name
            if full in KNOWN:  # `from stages import train as stage`: a module
                self.imports.append((node.lineno, full, text))
                self.bound[alias.asname or alias.name] = full
            elif is_private(alias.name):
                self.private.append((node.lineno, source, alias.name, text))

    def _attribute(self, node: ast.Attribute) -> None:
        """`stage._encode_batch`, `pipeline.fid._torchmetrics`: a chain rooted at a name bound to a module."""
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in self.bound:
            return
        module = self.bound[value.id]
        for i, name in enumerate(chain):
            if f"{module}.{name}" in KNOWN:
                module = f"{module}.{name}"
                continue
            if module in KNOWN and is_private(name):
                text = ast.unparse(node)  # `a.b._c.d` holds `a.b._c`: one use, named by the shorter text
                seen = [p for p in self.private if p[:3] == (node.lineno, module, name)]
                if not seen or len(seen[0][3]) > len(text):
                    self.private = [p for p in self.private if p not in seen] + [(node.lineno, module, name, text)]
            return

    def _call(self, node: ast.Call) -> None:
        """importlib.import_module("stages.x") / __import__("stages.x"); getattr/setattr(module, "_name", ...)."""
        func = ast.unparse(node.func)
        literal = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if func.split(".")[-1] in ("import_module", "__import__") and literal:
            self.imports.append((node.lineno, canonical(literal[0]), ast.unparse(node)))
        if func in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            obj, name = node.args[0], node.args[1]
            if (isinstance(obj, ast.Name) and obj.id in self.bound and isinstance(name, ast.Constant)
                    and isinstance(name.value, str) and is_private(name.value)):
                self.private.append((node.lineno, self.bound[obj.id], name.value, ast.unparse(node)))


USES = {path: Use(path) for path in sources(*LAYERS, SCRIPTS)}


def check(problems: list[str], rule: str) -> None:
    problems = list(dict.fromkeys(problems))  # `from stages import train` imports stages and stages.train: one line
    if problems:
        pytest.fail(f"{rule}; {len(problems)} place(s):\n  " + "\n  ".join(problems), pytrace=False)


def test_the_sources_are_found():
    assert {"pipeline.config", "stages.cli", "stages.train"} <= KNOWN
    assert any(p.parent.name == SCRIPTS for p in USES)


def test_pipeline_never_imports_stages():
    problems = [f"{use.where(line)}: {text}" for use in USES.values() if layer(use.module) == "pipeline"
                for line, module, text in use.imports if layer(module) == "stages"]
    check(problems, "pipeline/ (the library) imports stages/ (the verbs)")


def test_no_stage_uses_another_stages_private_names():
    problems = [f"{use.where(line)}: {text}  ({module}.{name})" for use in USES.values()
                if layer(use.module) == "stages"
                for line, module, name, text in use.private if layer(module) == "stages" and module != use.module]
    check(problems, "a stage uses another stage's private name")


@pytest.mark.parametrize("where", [*LAYERS, SCRIPTS])
def test_no_module_uses_a_pipeline_modules_private_names(where):
    problems = [f"{use.where(line)}: {text}  ({module}.{name})" for use in USES.values()
                if use.path.relative_to(ROOT).parts[0] == where
                for line, module, name, text in use.private if layer(module) == "pipeline" and module != use.module]
    check(problems, f"{where}/ uses a pipeline module's private name")
