"""Local training and evaluation of a peft model on tokenized tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedlora.core import seeds
from fedlora.runtime.training import dp as dpsgd


@dataclass(frozen=True)
class Encoded:
    """A tokenized corpus: ``input_ids``/``attention_mask`` ``(N, L)`` and ``labels`` ``(N,)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def batch(self, idx: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Return one batch on ``device``, trimmed to its longest sequence (padding is on the right)."""
        ids = self.input_ids[idx]
        mask = self.attention_mask[idx]
        length = int(mask.sum(dim=1).max())
        batch = {"input_ids": ids[:, :length], "attention_mask": mask[:, :length], "labels": self.labels[idx]}
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TokenizedOnDemand:
    """:class:`Encoded`'s interface over raw texts, each row tokenized the first time a batch asks for it.

    A process rarely reads the whole corpus: the server evaluates the test (and validation) split, a
    client the few batches of its local steps and its own held-out examples, so tokenizing every article
    in every process (2.5 s of the BBC corpus, in the driver and in each Ray actor) is mostly wasted.
    Rows are padded to ``max_length`` and cut at it, so a row's ids do not depend on which other rows it
    was tokenized with: what a batch holds is what tokenizing the whole corpus at once gives.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Callable[..., dict],
                 max_length: int) -> None:
        self.texts = list(texts)
        self.labels = torch.tensor(list(labels))
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._rows = Encoded(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long), self.labels)
        self._done = torch.zeros(len(self.texts), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.texts)

    def _fill(self, idx: Sequence[int]) -> Encoded:
        todo = sorted({int(i) for i in idx if not self._done[i]})
        if todo:
            enc = self._tokenizer([self.texts[i] for i in todo], truncation=True, max_length=self._max_length,
                                  padding="max_length", return_tensors="pt")
            if self._rows.input_ids.numel() == 0:  # the width is the tokenizer's padded length
                shape = (len(self.texts), enc["input_ids"].shape[1])
                self._rows = Encoded(torch.zeros(shape, dtype=enc["input_ids"].dtype),
                                     torch.zeros(shape, dtype=enc["attention_mask"].dtype), self.labels)
            self._rows.input_ids[todo] = enc["input_ids"]
            self._rows.attention_mask[todo] = enc["attention_mask"]
            self._done[todo] = True
        return self._rows

    @property
    def input_ids(self) -> torch.Tensor:
        """Every row's ids ``(N, L)`` (tokenizes the rows not read yet)."""
        return self._fill(range(len(self.texts))).input_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        """Every row's mask ``(N, L)`` (tokenizes the rows not read yet)."""
        return self._fill(range(len(self.texts))).attention_mask

    def batch(self, idx: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """:meth:`Encoded.batch` of the rows ``idx``, tokenizing those not read yet."""
        return self._fill(idx).batch(idx, device)


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings of one client round."""

    local_steps: int = 6
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dp: dpsgd.DPSettings | None = None  # sample-level DP (DP-SGD with Opacus), privacy=dp_sgd


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_plan(indices: list[int], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Return ``steps`` batches drawn by reshuffled passes over ``indices`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    need = steps * batch_size
    while len(order) < need:
        perm = torch.randperm(len(indices), generator=gen).tolist()
        order.extend(indices[i] for i in perm)
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def train_steps(
    model: torch.nn.Module, params: list[torch.nn.Parameter], data: Encoded, indices: list[int],
    settings: TrainSettings, seed: int, penalty: Callable[[], torch.Tensor] | None = None,
    drift: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] = (),
) -> float:
    """Run ``local_steps`` AdamW steps on batches of ``indices``; return the mean training loss.

    ``penalty`` (HetLoRA's rank regulariser) is added to every step's loss; the loss returned is the task's
    alone, comparable with every other method's. With ``settings.dp`` the steps are DP-SGD's
    (:func:`_train_steps_private`), which take no penalty (Opacus clips per-example gradients of the task
    loss; the configuration check refuses the pair).

    ``drift`` (controlled averaging, :mod:`fedlora.core.control`): ``(parameter, total)`` pairs; after every
    optimiser step each parameter moves by ``total / local_steps``, so the round adds ``total`` in all (for SGD
    exactly SCAFFOLD's corrected step; for AdamW outside the adaptive scaling, like decoupled weight decay).
    """
    if not indices:
        return math.nan
    if settings.dp is not None:
        if penalty is not None:
            raise ValueError("privacy.kind='dp_sgd' takes no loss penalty (HetLoRA's rank regulariser): Opacus would "
                             "not see it; set strategy.prune=false")
        if drift:
            raise ValueError("privacy.kind='dp_sgd' does not run with a drift correction (compression=scafcom); "
                             "use compression=compeft")
        return _train_steps_private(model, params, data, indices, settings, settings.dp, seed)
    steps = [(param, total.to(param.device, param.dtype) / settings.local_steps) for param, total in drift]
    torch.manual_seed(seed)  # dropout masks
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses = []
    for idx in batch_plan(indices, settings.local_steps, settings.batch_size, seed):
        out = model(**data.batch(idx, _device_of(model)))
        (out.loss + penalty() if penalty is not None else out.loss).backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, step in steps:
                param.add_(step.reshape(param.shape))
        losses.append(float(out.loss.detach()))
    model.eval()
    return sum(losses) / len(losses)


def _train_steps_private(
    model: torch.nn.Module, params: list[torch.nn.Parameter], data: Encoded, indices: list[int],
    settings: TrainSettings, dp: dpsgd.DPSettings, seed: int,
) -> float:
    """DP-SGD (:mod:`fedlora.runtime.training.dp`): Poisson batches, per-example clipping, Gaussian noise.

    The mean training loss is over the non-empty batches (``nan`` when every batch was empty).
    """
    rate = dpsgd.sample_rate(len(indices), settings.batch_size)
    sigma = dpsgd.noise_multiplier(dp, len(indices), settings.batch_size, settings.local_steps)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    losses = []
    with dpsgd.per_example_gradients(model) as wrapped:
        optimizer = dpsgd.PrivateOptimizer(
            params, torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay),
            sigma=sigma, clip=dp.clip, expected_batch_size=rate * len(indices),
            seed=seeds.dp_stream(seed, "noise"))
        for idx in dpsgd.poisson_batches(indices, rate, settings.local_steps,
                                            seeds.dp_stream(seed, "batches")):
            if idx:
                loss = dpsgd.per_example_mean_loss(wrapped, data.batch(idx, _device_of(model)))
                loss.backward()
                losses.append(float(loss.detach()))
            else:
                optimizer.empty_batch()
            optimizer.step(settings.max_grad_norm)
    model.eval()
    return sum(losses) / len(losses) if losses else math.nan


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, indices: list[int], batch_size: int = 64) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) on ``indices``."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        out = model(**data.batch(idx, _device_of(model)))
        total_loss += float(out.loss) * len(idx)
        correct += int((out.logits.argmax(dim=-1).cpu() == data.labels[idx]).sum())
    return total_loss / len(indices), correct / len(indices)
