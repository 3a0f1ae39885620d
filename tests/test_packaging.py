"""What `pip install .` puts into site-packages: one top-level name, `ditpipe` (issue 27 item 7). The repository's
top-level folders pipeline/, stages/ and configs/ install as ditpipe.pipeline, ditpipe.stages and ditpipe.configs
(pyproject.toml's package-dir; docs/design.md, "Packaging"), so nothing collides with PyPI's `pipeline` or `stages`."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_ditpipe(tmp_path):
    # a copy of what the build reads, so the build's egg-info and build/ folders stay out of the repository
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pipeline", "stages", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    code = ("import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = out / proc.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"ditpipe"}, top
    assert "ditpipe/configs/quickstart.yaml" in names and "ditpipe/stages/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ditpipe = ditpipe.stages.cli:entry" in zipfile.ZipFile(wheel).read(entry).decode()


def test_code_imports_the_installed_names_only():
    """A bare `import pipeline` works from the repository's root (it is on sys.path there) but not once installed,
    and would load a second copy of each module beside ditpipe.pipeline's."""
    bad = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/**/*.py"), *ROOT.glob("tests/**/*.py"),
                        *ROOT.glob("scripts/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] in ("pipeline", "stages", "ditpipe.configs")]
    assert not bad, "import ditpipe.pipeline / ditpipe.stages instead:\n" + "\n".join(bad)
