"""pyproject.toml: a fresh `pip install -e ".[cpu,dev]"` (what .ci/run does) brings every
package the code imports, in versions CI has run.

Every requirement is capped below the next major version of what is installed here (what CI
runs): transformers 5.25 changed what Qwen3-VL's processor replaces, so an untested major
would change embeddings without a word. A package imported directly but only present as some
other package's dependency (PyAV came with qwen-vl-utils) breaks the day that one drops it.
"""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
BUILD_REQUIREMENTS = [Requirement(line) for line in PYPROJECT["build-system"]["requires"]]
REQUIREMENTS = [Requirement(line) for line in [*PYPROJECT["project"]["dependencies"],
                                               *(line for lines in EXTRAS.values() for line in lines)]]


@pytest.mark.parametrize("requirement", BUILD_REQUIREMENTS, ids=str)
def test_every_build_requirement_is_capped(requirement):
    """pip builds in an isolated environment, so the setuptools installed here says nothing of it."""
    assert [spec for spec in requirement.specifier if spec.operator == "<"], f"{requirement}: needs a '<' bound"


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_every_requirement_is_capped_at_the_next_major_above_what_ci_runs(requirement):
    caps = [spec for spec in requirement.specifier if spec.operator == "<"]
    assert len(caps) == 1, f"{requirement}: needs one '<' bound, the next major version above what CI runs"
    try:
        installed = Version(metadata.version(requirement.name))
    except metadata.PackageNotFoundError:
        return  # an extra CI does not install (faiss-gpu, wandb, mutmut): capped, nothing to compare
    assert requirement.specifier.contains(installed, prereleases=True), f"{requirement} excludes installed {installed}"
    assert Version(caps[0].version).release == (installed.major + 1,), \
        f"{requirement}: the cap should be <{installed.major + 1} (installed {installed})"


def _third_party_imports(folder: str) -> dict[str, str]:
    """Top-level module -> file:line of its first import, for every module neither in the standard
    library nor in the project (conditional imports too: they run in some command)."""
    local = {path.stem for path in (ROOT / folder).rglob("*.py")} | {"umarvel"}
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _declared(*extras: str) -> set[str]:
    lines = [*PYPROJECT["project"]["dependencies"], *(line for extra in extras for line in EXTRAS[extra])]
    return {canonicalize_name(Requirement(line).name) for line in lines}


@pytest.mark.parametrize(("folder", "extras"), [("umarvel", tuple(EXTRAS)), ("tests", ("cpu", "dev"))])
def test_every_imported_package_is_declared(folder, extras):
    """The package's imports are in the dependencies or an extra; the tests' in what CI installs."""
    declared, providers = _declared(*extras), metadata.packages_distributions()
    missing = {module: where for module, where in _third_party_imports(folder).items()
               if not declared & {canonicalize_name(name) for name in providers.get(module, [module])}}
    assert not missing, f"imported but not declared in pyproject.toml ({', '.join(extras)}): {missing}"
