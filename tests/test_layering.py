"""The math layer never imports the runtime or glue layers (checked in fresh interpreters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATH_MODULES = sorted(
    ["fedlora.core.types", "fedlora.federation.keys", "fedlora.core.lora_math", "fedlora.core.validation",
     "fedlora.core.faults", "fedlora.core.metrics"]
    + [f"strategies.{p.stem}" for p in (ROOT / "strategies").glob("*.py") if p.stem != "__init__"]
)
FORBIDDEN = ("flwr", "hydra", "peft", "transformers", "ray", "omegaconf")


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_module_imports_no_runtime_or_glue(module: str) -> None:
    code = (f"import sys, {module}; bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in {out.stdout.strip()}"


def test_runtime_layer_imports_no_glue() -> None:
    code = ("import sys, fedlora.runtime.models, fedlora.runtime.training.workspace, fedlora.runtime.data.datasets, "
            "fedlora.runtime.tiny_decoder, fedlora.runtime.training.tasks, fedlora.runtime.training.sft, fedlora.runtime.data.instructions; "
            "print(','.join(m for m in ('flwr', 'hydra', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_strategies_package_is_ours() -> None:
    # A generic name like `strategies` could be shadowed by another installed distribution.
    import strategies

    assert Path(strategies.__file__).resolve().parent == ROOT / "strategies"


def test_fedlora_never_names_strategies() -> None:
    offenders = [p for p in (ROOT / "fedlora").rglob("*.py")
                 if "import strategies" in p.read_text() or "from strategies" in p.read_text()]
    assert offenders == []
