"""What users install: build floors, declared dependencies, the sdist's contents, typing and version markers."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import visual_buffet_siglip
from visual_buffet_siglip import doctor
from visual_buffet_siglip.config import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "visual_buffet_siglip"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
PROJECT = PYPROJECT["project"]
# import name -> distribution, where they differ; the host's own package is what we plug into, not a dependency
DISTRIBUTION = {"PIL": "pillow", "pillow_heif": "pillow-heif", "huggingface_hub": "huggingface-hub"}
NOT_DEPENDENCIES = {"visual_buffet"}


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    found = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {(req := Requirement(text)).name.lower(): req for text in found}


def floor(specifier: SpecifierSet) -> Version:
    return max(Version(spec.version) for spec in specifier if spec.operator in (">=", "=="))


def imported_modules() -> set[str]:
    """Top-level third-party modules the package imports anywhere (lazily included)."""
    modules: set[str] = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {name for name in modules if name not in sys.stdlib_module_names}


# --- floors -----------------------------------------------------------------------------------

def test_build_backend_floor_reads_the_spdx_license():
    assert isinstance(PROJECT["license"], str) and PROJECT["license-files"]
    [setuptools] = [Requirement(text) for text in PYPROJECT["build-system"]["requires"]
                    if Requirement(text).name == "setuptools"]
    assert floor(setuptools.specifier) >= Version("77"), "license = 'SPDX' and license-files need setuptools 77"


def test_torch_floor_has_what_the_engine_catches():
    assert "torch.OutOfMemoryError" in (PACKAGE / "engine.py").read_text("utf-8")
    torch_floor = floor(requirements()["torch"].specifier)
    assert torch_floor >= Version("2.5"), "torch.OutOfMemoryError appeared in torch 2.5"
    assert doctor.check_torch("2.4.1", None).status == doctor.FAIL
    assert doctor.check_torch(str(torch_floor), None).status == doctor.OK
    for manifest in (ROOT / "plugin.toml", PACKAGE / "data" / "plugin.toml"):
        declared = tomllib.loads(manifest.read_text("utf-8"))["plugin"]["dependencies"]["torch"]
        assert floor(SpecifierSet(declared)) == torch_floor, manifest


# --- dependencies match imports -----------------------------------------------------------------

def test_every_imported_package_is_declared():
    declared = set(requirements())
    for extra in PROJECT["optional-dependencies"]:
        declared |= set(requirements(extra))
    for module in imported_modules() - NOT_DEPENDENCIES:
        assert DISTRIBUTION.get(module, module).lower() in declared, f"{module} is imported but not declared"
    assert "pyarrow" in requirements("ray"), "distributed.py imports pyarrow itself: the ray extra declares it"


def test_accelerate_is_only_in_the_quantization_extra():
    assert "accelerate" not in imported_modules()
    assert "accelerate" not in requirements(), "nothing but bitsandbytes loading needs accelerate"
    assert "accelerate" in requirements("quant"), "transformers' bitsandbytes quantizer refuses to run without it"


def test_parquet_without_pyarrow_names_the_extra(monkeypatch, tmp_path):
    from visual_buffet_siglip.distributed import parquet_sink
    from visual_buffet_siglip.outputs import UsageError

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UsageError, match=r"visual-buffet-siglip\[ray\]"):
        parquet_sink(str(tmp_path / "out.parquet"))
    assert not (tmp_path / "out.parquet").exists()


# --- typing, public names, metadata ---------------------------------------------------------------

def test_typed_marker_ships_in_the_wheel():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["visual_buffet_siglip"]
    assert "Typing :: Typed" in PROJECT["classifiers"]


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__main__.py"))
def test_public_modules_declare_all(module):
    """Read, not imported: host.py imports the host's own package."""
    tree = ast.parse((PACKAGE / module).read_text("utf-8"))
    defined: set[str] = set()
    exported: list[str] | None = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.add(name.id)
                        if name.id == "__all__":
                            exported = ast.literal_eval(node.value)
        elif isinstance(node, ast.If):  # TYPE_CHECKING imports and version switches
            defined |= {(alias.asname or alias.name) for sub in ast.walk(node)
                        if isinstance(sub, (ast.Import, ast.ImportFrom)) for alias in sub.names}
    assert exported, f"{module} has no __all__"
    lazy = {"SiglipTagger"} if module == "__init__.py" else set()  # the package's __getattr__
    assert set(exported) - defined - lazy == set()


def test_classifiers_match_requires_python():
    python = SpecifierSet(PROJECT["requires-python"])
    versions = {c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert {"3.10", "3.11", "3.12", "3.13"} <= versions
    assert all(python.contains(f"{v}.0") for v in versions)
    assert "Environment :: Console" in PROJECT["classifiers"]
    assert "Operating System :: OS Independent" in PROJECT["classifiers"]


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "visual_buffet_siglip.__version__"}
    for manifest in (ROOT / "plugin.toml", PACKAGE / "data" / "plugin.toml"):
        plugin = tomllib.loads(manifest.read_text("utf-8"))["plugin"]
        assert plugin["version"] == visual_buffet_siglip.__version__, manifest


def test_readme_images_load_from_the_package_index():
    """PyPI renders README.md away from the repository: relative image paths break there."""
    repo = PROJECT["urls"]["Homepage"].removeprefix("https://github.com/")
    readme = (ROOT / "README.md").read_text("utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(r'<img[^>]+src="([^"]+)"', readme)
    assert images
    for target in images:
        assert target.startswith(f"https://raw.githubusercontent.com/{repo}/"), target
        assert (ROOT / target.split("/", 6)[6]).is_file(), f"{target} names no file in the repository"


# --- the sdist ----------------------------------------------------------------------------------

def test_sdist_can_run_the_suite(tmp_path):
    """Built by the backend itself from a copy (the build writes egg-info beside the sources)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".venv", "venv", "_work", ".pytest_cache",
        ".hypothesis", ".mypy_cache", ".ruff_cache"))
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, check=True,
                   capture_output=True, timeout=300)
    [sdist] = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        pkg_info = archive.extractfile(f"{sdist.name[:-7]}/PKG-INFO").read().decode()
    needed = {"CHANGELOG.md", "LICENSE", "README.md", "tests/conftest.py", "tests/checkpoints.py",
              "tests/webdriver.py", "visual_buffet_siglip/py.typed", "visual_buffet_siglip/data/plugin.toml",
              "tests/standin_host/src/visual_buffet/plugins/base.py", "tests/standin_host/plugins/siglip/plugin.toml"}
    assert needed - names == set()
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert f"\nVersion: {visual_buffet_siglip.__version__}\n" in pkg_info
