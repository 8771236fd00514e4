"""fedlora.results.spectrum: the top-k energy share of each module's product in a saved (peft-format) adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedlora.results import spectrum

PREFIX = "base_model.model.bert.encoder.layer.{}.attention.self.query"


def write_adapter(folder: Path, singular: list[list[float]]) -> Path:
    """An adapter whose module i has B A with singular values ``singular[i]`` (split unevenly between B and A)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.classifier.modules_to_save.weight": torch.zeros(5, 8)}
    for i, values in enumerate(singular):
        r = len(values)
        q_m = torch.linalg.qr(torch.randn(8, r, generator=gen)).Q
        q_n = torch.linalg.qr(torch.randn(6, r, generator=gen)).Q
        scale = torch.arange(1, r + 1, dtype=torch.float32)
        tensors[PREFIX.format(i) + ".lora_B.weight"] = (q_m * torch.tensor(values) / scale).contiguous()
        tensors[PREFIX.format(i) + ".lora_A.weight"] = (scale[:, None] * q_n.T).contiguous()
    save_file(tensors, str(folder / spectrum.ADAPTER_FILE))
    return folder


def test_shares_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write_adapter(tmp_path / "run" / "adapter", [[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    got = spectrum.shares(adapter, [1, 2])
    assert got[1] == pytest.approx([9 / 14, 1 / 2], rel=1e-5) and got[2] == pytest.approx([13 / 14, 1.0], rel=1e-5)
    assert spectrum.main([str(adapter), "--top", "2,1"]) == 0
    out = capsys.readouterr().out
    assert "| top-1 share, mean (min) | top-2 share, mean (min) |" in out
    assert f"| {adapter} | 2 | 0.571 (0.500) | 0.964 (0.929) |" in out


def test_bad_input_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert spectrum.main([str(tmp_path)]) == 2
    assert "no adapter_model.safetensors; give a run's adapter folder" in capsys.readouterr().err
    (tmp_path / "heads").mkdir()
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "heads" / spectrum.ADAPTER_FILE))
    assert spectrum.main([str(tmp_path / "heads")]) == 2
    assert "no LoRA factors" in capsys.readouterr().err
    for bad in ("0", "x"):
        with pytest.raises(SystemExit) as exc:
            spectrum.main([str(tmp_path), "--top", bad])
        assert exc.value.code == 2 and f"--top='{bad}'" in capsys.readouterr().err
