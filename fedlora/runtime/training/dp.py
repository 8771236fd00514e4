"""Sample-level differential privacy: DP-SGD in a client's local training, with Opacus.

Everything here is Opacus' (per-example gradients, clipping, Gaussian noise, Poisson sampling and
the privacy accountants); this module only fits it to fedlora's training loop:

* **Batches** are Poisson samples of the client's partition (each example in each step with
  probability ``q = min(1, batch_size / n_k)``, Opacus' ``UniformWithReplacementSampler``, seeded per
  client and round), the sampling the accountants' amplification bound assumes. A batch may be
  empty; it still takes a noised step, as Opacus does.
* **Per-example clipping and noise** (Opacus' ``GradSampleModule`` and ``DPOptimizer``): each
  example's gradient over the parameters the client trains (its LoRA factors at its own rank, a
  frozen ``A`` excluded as FFA-LoRA and RoLoRA freeze it, and the head) is clipped to L2 norm
  ``clip``; the sum gets noise of standard deviation ``noise_multiplier * clip`` and is divided by
  the expected batch size ``q * n_k``. ``train.max_grad_norm`` then clips the noised step as without
  privacy, which is post-processing. The noise is drawn from a generator seeded per client and round,
  so a resumed run draws exactly what the uninterrupted one drew (not a cryptographically secure
  source: this is a simulator).
* **Calibration**: given ``target_epsilon``, each client picks its own ``noise_multiplier`` with
  Opacus' ``get_noise_multiplier`` so that, at ``delta``, ``local_steps x num_rounds`` steps at its
  sampling rate spend at most ``target_epsilon``: the budget holds even for a client sampled in every
  round. Given ``noise_multiplier`` instead, every client uses it.
* **Accounting** (:func:`epsilon`): a client's epsilon after it trained in ``rounds`` rounds, from
  the accountant's composition of ``rounds x local_steps`` steps. The server reports it per client and
  round (``fedlora.federation.loop``), counting every round a client was sent a training message.

Everything the server does with the clients' updates is post-processing of DP-SGD outputs, so this
level composes with every strategy and compressor.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ACCOUNTANTS = ("rdp", "prv", "gdp")
# Opacus' default RDP orders stop at 63; large budgets (epsilon 8 over few steps) are tightest at
# higher orders, where the default range makes Opacus warn and overstate epsilon. A few sparse high
# orders cover them (each order costs time in every calibration and every epsilon).
_RDP_ALPHAS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512])


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD of one run (``conf/privacy/dp_sgd.yaml``).

    Attributes
    ----------
    clip:
        ``C``, the L2 bound of each example's gradient.
    delta:
        The ``delta`` of every reported ``(epsilon, delta)``.
    target_epsilon:
        Each client's budget over ``rounds`` rounds; its noise multiplier is calibrated to it.
        ``None``: use ``noise_multiplier``.
    noise_multiplier:
        ``sigma``: the noise standard deviation over ``clip`` (used when ``target_epsilon`` is ``None``).
    accountant:
        Opacus' accountant: ``rdp``, ``prv`` or ``gdp``.
    rounds:
        The rounds the budget covers (the run's ``num_rounds``).
    """

    clip: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None
    accountant: str = "rdp"
    rounds: int = 1


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson sampling rate of one step: ``min(1, batch_size / n)``."""
    return min(1.0, batch_size / max(num_examples, 1))


def _epsilon_kwargs(accountant: str) -> dict[str, object]:
    return {"alphas": list(_RDP_ALPHAS)} if accountant == "rdp" else {}


def _calibrated(target: float | None, sigma: float | None, delta: float, rate: float, steps: int,
                accountant: str) -> float:
    """The configured ``sigma``, or Opacus' least noise multiplier that keeps ``target`` over ``steps`` at ``rate``."""
    if target is None:
        if sigma is None:
            raise ValueError("privacy: set target_epsilon or noise_multiplier")
        return float(sigma)
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415

    with warnings.catch_warnings():
        # the search tries large sigmas, whose epsilon is tightest beyond any order tried; harmless there
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01,
                                          **_epsilon_kwargs(accountant)))


def _spent(sigma: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """Opacus' epsilon at ``delta`` of ``steps`` sampled Gaussian mechanisms (0 for no step)."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import create_accountant  # noqa: PLC0415

    acc = create_accountant(accountant)
    acc.history.append((sigma, rate, steps))
    return float(acc.get_epsilon(delta=delta, **_epsilon_kwargs(accountant)))


@functools.lru_cache(maxsize=4096)
def noise_multiplier(dp: DPSettings, num_examples: int, batch_size: int, local_steps: int) -> float:
    """The client's ``sigma``: the configured one, or the least that keeps ``target_epsilon`` over ``dp.rounds``."""
    return _calibrated(dp.target_epsilon, dp.noise_multiplier, dp.delta, sample_rate(num_examples, batch_size),
                       local_steps * dp.rounds, dp.accountant)


@functools.lru_cache(maxsize=4096)
def epsilon(dp: DPSettings, num_examples: int, batch_size: int, local_steps: int, rounds: int) -> float:
    """The client's epsilon at ``dp.delta`` after training in ``rounds`` rounds (0 before any)."""
    if rounds <= 0:
        return 0.0
    return _spent(noise_multiplier(dp, num_examples, batch_size, local_steps), sample_rate(num_examples, batch_size),
                  local_steps * rounds, dp.delta, dp.accountant)


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level DP (DP-FedAvg, ``conf/privacy/dp_fedavg.yaml``); the mechanism is :mod:`fedlora.core.privacy`.

    ``sample_rate`` is the share of clients a round samples and ``rounds`` the run's rounds: the
    accountant composes ``rounds`` sampled Gaussian mechanisms at that rate.
    """

    clip: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    noise_multiplier: float | None = 1.0
    accountant: str = "rdp"
    sample_rate: float = 1.0
    rounds: int = 1


@functools.lru_cache(maxsize=256)
def client_noise_multiplier(dp: ClientDPSettings) -> float:
    """``z``: the configured one, or the least that keeps ``target_epsilon`` over ``dp.rounds`` rounds."""
    return _calibrated(dp.target_epsilon, dp.noise_multiplier, dp.delta, dp.sample_rate, dp.rounds, dp.accountant)


@functools.lru_cache(maxsize=4096)
def client_epsilon(dp: ClientDPSettings, rounds: int) -> float:
    """Every client's epsilon at ``dp.delta`` after ``rounds`` rounds of the mechanism (0 before any)."""
    if rounds <= 0:
        return 0.0
    return _spent(client_noise_multiplier(dp), dp.sample_rate, rounds, dp.delta, dp.accountant)


def poisson_batches(indices: Sequence[int], rate: float, steps: int, seed: int) -> list[list[int]]:
    """``steps`` Poisson samples of ``indices`` at ``rate`` (Opacus' sampler, seeded; a batch may be empty)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: PLC0415

    sampler = UniformWithReplacementSampler(num_samples=len(indices), sample_rate=rate,
                                            generator=torch.Generator().manual_seed(seed), steps=steps)
    return [[indices[i] for i in batch] for batch in sampler]


def per_example_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch mean of per-example losses: what Opacus' ``loss_reduction="mean"`` assumes.

    A classifier's loss already is that (one label per example). A causal LM's built-in loss averages
    over every target token of the batch, so an example's share of the gradient would depend on the
    other examples' lengths (and its clipped gradient on data not its own); here each example's loss
    is the mean over its own target tokens (labels ``-100`` ignored), then the batch mean is taken.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return model(**batch).loss
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits, target = out.logits[:, :-1].float(), labels[:, 1:]  # predict token t+1 from the prefix through t
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                               reduction="none")
    counted = (target != -100).sum(dim=1).clamp(min=1)
    return (tokens.sum(dim=1) / counted).mean()


class PrivateOptimizer:
    """Opacus' ``DPOptimizer`` around an optimiser of ``params``, whose per-example gradients Opacus captures."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *, sigma: float,
                 clip: float, expected_batch_size: float, seed: int) -> None:
        from opacus.optimizers import DPOptimizer  # noqa: PLC0415

        self.params = params
        # mean reduction: the model's loss is the batch mean; Opacus rescales to per-example gradients
        self.dp = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                              expected_batch_size=max(1, round(expected_batch_size)), loss_reduction="mean",
                              generator=torch.Generator().manual_seed(seed))

    def empty_batch(self) -> None:
        """A step whose Poisson batch drew no example: zero per-example gradients, noise only."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self, max_grad_norm: float) -> None:
        """Clip per example, add noise, clip the noised step to ``max_grad_norm`` (0: no), update."""
        if self.dp.pre_step():
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
            self.dp.original_optimizer.step()
        self.dp.zero_grad(set_to_none=True)


@contextmanager
def per_example_gradients(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model wrapped in Opacus' ``GradSampleModule`` for the duration; its hooks removed after.

    The host's model is shared by every client and rank of the process, so the wrapping never
    outlives one client's round.
    """
    from opacus import GradSampleModule  # noqa: PLC0415

    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError("privacy=dp_sgd cannot capture per-example gradients through gradient checkpointing; "
                         "set model.gradient_checkpointing=false")
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        with warnings.catch_warnings():
            # the frozen embeddings need no input gradient: torch notes that the hooks fire on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            yield wrapped
    finally:
        wrapped.to_standard_module()  # Opacus removes its hooks and the grad_sample attributes
