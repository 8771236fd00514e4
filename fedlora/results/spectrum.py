"""How much of each adapted module's product ``B A`` lies in its top singular directions, for saved adapters.

A diagnostic for heterogeneous ranks: a client of rank ``k`` that receives the global adapter truncated by
SVD (FlexLoRA) keeps the top-``k`` share of each module's product; a share near 1 means the truncation loses
little. Reads the ``adapter_model.safetensors`` that every run saves in peft's format (``runs/<run>/adapter``)
and never forms a dense ``m x n`` product (:func:`fedlora.core.lora_math.top_energy_share`)::

    python -m fedlora.results.spectrum runs/<run>/adapter [more adapter dirs] [--top 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from fedlora.core import lora_math as lm

ADAPTER_FILE = "adapter_model.safetensors"


def shares(adapter_dir: Path, tops: list[int]) -> dict[int, list[float]]:
    """Each top ``k`` in ``tops`` -> the top-``k`` energy share of every adapted module (module order).

    Raises
    ------
    FileNotFoundError
        When ``adapter_dir`` holds no ``adapter_model.safetensors``.
    ValueError
        When the file holds no LoRA factors.
    """
    path = adapter_dir / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_FILE}; give a run's adapter folder, "
                                "e.g. runs/<run>/adapter")
    pairs, _ = lm.split_state(load_file(str(path)))
    if not pairs:
        raise ValueError(f"{path}: no LoRA factors (keys ending .lora_A.weight / .lora_B.weight)")
    return {k: [lm.top_energy_share(pair.b, pair.a, k) for pair in pairs.values()] for k in tops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.results.spectrum", description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter folders (peft format), e.g. runs/<run>/adapter")
    parser.add_argument("--top", default="1,2", help="comma-separated ranks k (default 1,2)")
    args = parser.parse_args(argv)
    try:
        tops = sorted({int(t) for t in args.top.split(",")})
    except ValueError:
        parser.error(f"--top={args.top!r}: give positive whole numbers separated by commas, e.g. --top 1,2,4")
    if tops[0] < 1:
        parser.error(f"--top={args.top!r}: every k must be at least 1, e.g. --top 1,2,4")
    header = " | ".join(f"top-{k} share, mean (min)" for k in tops)
    print(f"| adapter | modules | {header} |\n|---|---|{'---|' * len(tops)}")
    for adapter in args.adapters:
        try:
            got = shares(adapter, tops)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        cells = " | ".join(f"{sum(v) / len(v):.3f} ({min(v):.3f})" for v in got.values())
        print(f"| {adapter} | {len(got[tops[0]])} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
