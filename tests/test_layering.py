"""The layers import one way only, checked two ways for every module of every package.

Layers, from the bottom (README "Layout"):

1. math: ``fedlora.core``, ``fedlora.compression``, ``strategies`` (torch, numpy, the standard library);
2. the ML runtime ``fedlora.runtime`` (transformers, peft, datasets) and the outputs ``fedlora.results``;
3. the round loop ``fedlora.federation`` (no Flower, no model code);
4. ``fedlora.config`` (typed settings and validation), then ``fedlora.serving`` (a run assembled);
5. the glue: ``fedlora.flower`` (the only flwr importer besides the CLI), then ``fedlora.cli``.

``test_static_imports_point_down`` reads every module's imports (AST) and checks which fedlora
packages it names; ``test_what_a_layer_loads`` imports each module in a fresh interpreter and checks
which third-party frameworks end up loaded. A new module is covered by being in its package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the fedlora packages its modules may import (besides their own)
ALLOWED = {
    "fedlora.core": set(),
    "fedlora.compression": {"fedlora.core"},
    "strategies": {"fedlora.core"},
    "fedlora.runtime": {"fedlora.core"},
    "fedlora.results": {"fedlora.core"},
    "fedlora.federation": {"fedlora.core", "fedlora.results"},
    "fedlora.config": {"fedlora.core", "fedlora.runtime", "fedlora.results", "fedlora.federation"},
    "fedlora.serving": {"fedlora.core", "fedlora.runtime", "fedlora.results", "fedlora.federation",
                        "fedlora.config"},
    "fedlora.flower": {"fedlora.core", "fedlora.runtime", "fedlora.results", "fedlora.federation",
                       "fedlora.config", "fedlora.serving"},
    "fedlora.cli": {"fedlora.core", "fedlora.runtime", "fedlora.results", "fedlora.federation",
                    "fedlora.config", "fedlora.serving", "fedlora.flower"},
}
# package -> frameworks that importing any of its modules must not load
FORBIDDEN = {
    "fedlora.core": ("flwr", "hydra", "omegaconf", "ray", "peft", "transformers", "datasets"),
    "fedlora.compression": ("flwr", "hydra", "omegaconf", "ray", "peft", "transformers", "datasets"),
    "strategies": ("flwr", "hydra", "omegaconf", "ray", "peft", "transformers", "datasets"),
    "fedlora.runtime": ("flwr", "hydra", "omegaconf", "ray"),
    "fedlora.results": ("flwr", "hydra", "omegaconf", "ray", "peft", "transformers"),
    "fedlora.federation": ("flwr", "hydra", "omegaconf", "ray", "peft", "transformers"),
    "fedlora.config": ("flwr", "hydra", "ray"),
    "fedlora.serving": ("flwr", "hydra", "ray"),
}


def package_of(module: str) -> str:
    """The layer package of a module name."""
    parts = module.split(".")
    return parts[0] if parts[0] == "strategies" else ".".join(parts[:2])


def modules() -> list[str]:
    """Every module of the fedlora and strategies packages."""
    out = []
    for path in sorted([*(ROOT / "fedlora").rglob("*.py"), *(ROOT / "strategies").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


LAYERED = [m for m in modules() if package_of(m) in ALLOWED]


def imported_fedlora_packages(module: str) -> set[str]:
    """The fedlora/strategies packages a module names in its imports (anywhere in it)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {package_of(n) for n in names if n.split(".")[0] in ("fedlora", "strategies") and n != "fedlora"}


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in modules() if package_of(m) not in ALLOWED and m not in ("fedlora", "fedlora.__main__")]
    assert loose == [], "modules outside the layer packages"


@pytest.mark.parametrize("module", LAYERED)
def test_static_imports_point_down(module: str) -> None:
    own = package_of(module)
    wrong = imported_fedlora_packages(module) - ALLOWED[own] - {own}
    assert wrong == set(), f"{module} ({own}) imports {sorted(wrong)}"


def _loaded(modules_: list[str], forbidden: tuple[str, ...]) -> str:
    code = (f"import sys; import {', '.join(modules_)}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_what_a_layer_loads(package: str) -> None:
    """Import every module of the package in one fresh interpreter; on a failure, name the module."""
    members = [m for m in LAYERED if package_of(m) == package]
    if _loaded(members, FORBIDDEN[package]):
        culprits = {m: bad for m in members if (bad := _loaded([m], FORBIDDEN[package]))}
        pytest.fail(f"{package} loads forbidden frameworks: {culprits}")


def test_strategies_package_is_ours() -> None:
    # A generic name like `strategies` could be shadowed by another installed distribution.
    import strategies

    assert Path(strategies.__file__).resolve().parent == ROOT / "strategies"


def test_fedlora_never_names_strategies() -> None:
    # Strategies are reached only through their config's _target_: fedlora lists none of them.
    offenders = [m for m in modules() if m.startswith("fedlora") and "strategies" in imported_fedlora_packages(m)]
    assert offenders == []
