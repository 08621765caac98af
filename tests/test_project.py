"""The project's shape: packaging, console scripts, import direction, Docker files (static checks:
no Docker engine runs on CI machines)."""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def _imported_top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The model knows nothing of FAISS or HTTP; nothing imports the service.
        ("model", {"indexer", "service", "faiss", "fastapi", "starlette", "uvicorn"}),
        ("indexer", {"service", "fastapi", "starlette", "uvicorn"}),
        ("bench", {"service"}),
    ],
)
def test_import_direction(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_top_level(path) & forbidden)
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_console_scripts_resolve() -> None:
    assert set(SCRIPTS) == {
        "vldeformer-index",
        "vldeformer-serve",
        "vldeformer-train",
        "vldeformer-eval",
    }
    for name, target in SCRIPTS.items():
        module_name, _, attribute = target.partition(":")
        entry = getattr(importlib.import_module(module_name), attribute)
        assert callable(entry), name


def test_dependencies_and_extras() -> None:
    project = PYPROJECT["project"]
    runtime = " ".join(project["dependencies"])
    for needed in (
        "torch>=",
        "transformers",
        "faiss-cpu",
        "pillow>=12.3",
        "starlette>=0.47.2",
        "python-multipart>=0.0.18",
    ):
        assert needed in runtime, needed
    assert any(dep.startswith("faiss-gpu-cu12") for dep in project["optional-dependencies"]["gpu"])
    assert not any("==" in dep for dep in project["dependencies"] if dep.startswith("torch"))


def test_makefile_pins_torch_through_an_overridable_variable() -> None:
    """An exact default pin (any version the project's own bound allows), overridable."""
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    assert pin, "TORCH_SPEC must default to an exact torch==<version> pin"
    (bound,) = [dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("torch")]
    assert SpecifierSet(bound.removeprefix("torch")).contains(pin[1]), (pin[1], bound)
    assert '"$(TORCH_SPEC)"' in makefile


def test_make_coverage_measures_every_package() -> None:
    recipe = re.search(r"^coverage:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile has no coverage target"
    for package in ("model", "indexer", "service"):
        assert f"--cov={package}" in recipe[1], package
    assert any(
        dep.startswith("pytest-cov") for dep in PYPROJECT["project"]["optional-dependencies"]["dev"]
    )


def test_compose_file_describes_indexer_and_api() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"indexer", "indexer-ray", "api"}
    assert services["indexer"]["profiles"] == ["index"]
    assert services["indexer-ray"]["profiles"] == ["ray"]
    assert "index" in compose["volumes"]
    for name, service in services.items():
        volumes = service["volumes"]
        assert any(v.split(":")[0] == "index" for v in volumes), (
            f"{name} lacks the shared index volume"
        )
        # "SOURCE:TARGET[:MODE]", where SOURCE may hold "${VAR:-default}": read from the right.
        assert any(v.endswith(":/gallery:ro") for v in volumes), (
            f"{name}: gallery must be read-only"
        )
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices), name
        command = service["command"]
        if name == "indexer-ray":  # options after an entrypoint that adds --ray-address if set
            assert "exec vldeformer-index build --engine ray" in " ".join(service["entrypoint"])
            assert "/index" in command and "--model" in command
            continue
        assert command[0] in SCRIPTS, f"{name} runs {command[0]!r}, not a console script"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    indexer_command = services["indexer"]["command"]
    assert indexer_command[1] == "build" and "/index" in indexer_command


def test_dockerfile_runs_as_non_root_with_readiness_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime", dockerfile, re.M)
    assert "make install-gpu" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", dockerfile, re.M)
    assert re.search(r'^CMD \["vldeformer-serve"\]', dockerfile, re.M)
    for variable in ("VLD_MODEL_DIR", "VLD_INDEX_ROOT"):
        assert variable in dockerfile


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci
    readme_head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "make demo" in readme_head and "make test" in readme_head
