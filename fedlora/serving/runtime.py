"""The runtime behind the loop: the server's global model and the clients' training, on the workspace.

Each process (the server, every Ray actor, a deployed node's ClientApp) holds one workspace per
run (:func:`fedlora.runtime.training.workspace.get_workspace`: the frozen base model with one peft
adapter per rank, the tokenized data, the split and the partitions). These classes adapt it to the
loop's protocols:

* :class:`WorkspaceModel` is the loop's :class:`~fedlora.federation.loop.ServerModel` (evaluate the
  global adapter on the held-out set, save it in peft's format);
* :class:`WorkspaceTrainer` is a client's :class:`~fedlora.federation.client.Trainer` (its partition,
  the configured local steps, a seed per round and client);
* :class:`PooledTrainer` and :class:`PooledTransport` make the centralized bound: one learner at the
  largest rank on the union of every client's training data, with as many optimiser steps per round
  as the federation spends (local steps times the clients sampled per round), evaluated like a
  federation. Nothing is communicated and no Flower runs; FedAvg of its single update is that update.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedlora.core import lora_math as lm
from fedlora.core import seeds
from fedlora.core.metrics import Metric
from fedlora.core.privacy import ClientLevel
from fedlora.core.types import AdapterSpec, AdapterState, BaseMerge, ClientPlan
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.memory import InMemoryTransport
from fedlora.federation.transport import ClientInfo
from fedlora.results.generations import log_generations
from fedlora.runtime.models import AdapterHost, save_peft_adapter, save_reload_base
from fedlora.runtime.training import dp as dpsgd
from fedlora.runtime.training.local import TrainSettings, train_steps
from fedlora.runtime.training.workspace import Workspace, WorkspaceKey, get_workspace


def _set_base(ws: Workspace, merges: Sequence[BaseMerge]) -> None:
    """Put the base weights at ``W0 + sum of merges`` (nothing to do when the count is unchanged)."""
    ws.host.set_base(len(merges), lm.concat_merges(merges) if merges else None)


class WorkspaceModel:
    """The global model on the server: evaluation on the held-out set, generations, the saved adapter."""

    def __init__(self, ws: Workspace, run_dir: Path, *, eval_batch_size: int, seed: int) -> None:
        self.ws = ws
        self.run_dir = Path(run_dir)
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.metric: Metric = ws.task.metric
        self.label_names: tuple[str, ...] = tuple(ws.label_names)

    def spec(self, r_max: int) -> AdapterSpec:
        """The adapted modules and the initial head."""
        return self.ws.host.spec(r_max)

    def scaling(self, rank: int) -> float:
        """``s = alpha / r`` (the same at every rank: ``alpha = alpha_per_rank * r``)."""
        return self.ws.host.settings.scaling(rank)

    def alpha(self, rank: int) -> float:
        """``lora_alpha`` at ``rank``."""
        return self.ws.host.settings.alpha(rank)

    def evaluate(self, server_round: int, adapter: AdapterState, rank: int,
                 merges: Sequence[BaseMerge]) -> dict[str, float]:
        """The task's metrics of base + merges + ``adapter``; a causal LM's generations go to the run."""
        _set_base(self.ws, merges)
        self.ws.host.load_state(rank, adapter)
        metrics = self.ws.evaluate(self.eval_batch_size)
        metrics.update(self.ws.evaluate_validation(self.eval_batch_size))
        generations = self.ws.generate()
        if generations:
            log_generations(self.run_dir, server_round, generations)
        return metrics

    def save(self, adapter: AdapterState, rank: int, alpha: float) -> dict[str, Any]:
        """The adapter in peft's format (and the built-in tiny decoder's base, which exists nowhere else)."""
        adapter_dir = self.run_dir / "adapter"
        settings = self.ws.host.settings
        save_peft_adapter(adapter_dir, settings, len(self.label_names), adapter, rank, alpha, self.seed)
        base_dir = save_reload_base(self.run_dir / "base", settings)
        return {"adapter_dir": str(adapter_dir), **({"base_dir": base_dir} if base_dir else {})}

    def notes(self) -> list[str]:
        """How many examples were cut to the model's maximum length."""
        if not self.ws.truncated:
            return []
        return [f"{self.ws.truncated} of {len(self.ws.data.input_ids)} examples were cut to "
                f"model.max_length={self.ws.host.settings.max_length} tokens"]


def rank_penalty(host: AdapterHost, plan: ClientPlan) -> Callable[[], torch.Tensor] | None:
    """HetLoRA's rank regulariser on the plan's adapter (``weight`` times the tail norm beyond the rank it
    may prune to, :func:`fedlora.core.lora_math.tail_norm`), or ``None`` when the plan asks for none."""
    prune = plan.prune
    if prune is None or prune.weight == 0:
        return None
    keep = lm.pruned_rank(plan.rank, prune.gamma, prune.min_rank)
    if keep >= plan.rank:
        return None
    factors = host.lora_factors(plan.rank)
    return lambda: prune.weight * lm.tail_norm(factors, keep)


class WorkspaceTrainer:
    """A client's local training on its partition of the workspace's data."""

    def __init__(self, key: WorkspaceKey, train: TrainSettings, seed: int, *, reload_per_call: bool = False,
                 eval_batch_size: int = 64) -> None:
        self.key = key
        self.settings = train
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.reload_per_call = reload_per_call  # benchmark only: load the base model on every call

    @property
    def ws(self) -> Workspace:
        """This process's workspace (built on first use)."""
        return get_workspace(self.key)

    def modules(self) -> Mapping[str, tuple[int, int]]:
        """The adapted modules."""
        return self.ws.host.spec(1).modules

    def num_examples(self, client_id: int) -> int:
        """The size of the client's partition."""
        return len(self.ws.partition(client_id))

    def indices(self, client_id: int) -> list[int]:
        """The examples the client trains on."""
        return self.ws.partition(client_id)

    def steps(self) -> TrainSettings:
        """The optimisation settings of one round."""
        return self.settings

    def round_seed(self, client_id: int, server_round: int) -> int:
        """The seed of the client's batches and dropout in this round."""
        return seeds.client_training(self.seed, server_round, client_id)

    def train(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
              ) -> tuple[AdapterState, float]:
        """Train from the assignment's start adapter on base + merges; return the adapter and mean loss."""
        ws = self.ws
        if self.reload_per_call:
            ws.reload_host()  # the common "load the model on every call" pattern, to measure what sharing saves
        _set_base(ws, merges)
        rank = assignment.plan.rank
        ws.host.load_state(rank, assignment.start)
        params = ws.host.set_trainable(rank, assignment.plan.train_lora_a, assignment.plan.train_lora_b)
        drift = []
        if assignment.drift:  # controlled averaging: c - c_k over the round, on the live parameters
            live = ws.host.state_parameters(rank)
            drift = [(live[k], v) for k, v in sorted(assignment.drift.items())]
        loss = train_steps(ws.host.model, params, ws.data, self.indices(client_id), self.steps(),
                           self.round_seed(client_id, assignment.server_round), rank_penalty(ws.host, assignment.plan),
                           drift)
        return ws.host.get_state(rank), loss

    def test_indices(self, client_id: int) -> list[int]:
        """The examples the client evaluates on (``data.client_test_fraction``; empty without)."""
        return self.ws.client_test(client_id)

    def evaluate(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
                 ) -> tuple[dict[str, float], int]:
        """The assignment's start adapter on base + merges, evaluated on the client's held-out examples."""
        indices = self.test_indices(client_id)
        if not indices:
            return {}, 0
        ws = self.ws
        _set_base(ws, merges)
        ws.host.load_state(assignment.plan.rank, assignment.start)
        return ws.evaluate_indices(indices, self.eval_batch_size), len(indices)

    def save(self, path: Path, adapter: AdapterState, rank: int, merges: Sequence[BaseMerge]) -> None:
        """``adapter`` in peft's format at ``path``, the merges folded in (as the server saves the global one)."""
        settings = self.ws.host.settings
        folded, folded_rank, alpha = lm.fold_for_peft(adapter, settings.scaling(rank), merges, settings.alpha(rank))
        save_peft_adapter(path, settings, len(self.ws.label_names), folded, folded_rank, alpha, self.seed)


class DPLedger:
    """The loop's :class:`~fedlora.federation.loop.PrivacyLedger` for DP-SGD: Opacus' accountant per client.

    ``train`` must be the settings the clients train with (the pooled learner's, with its larger
    step count, for the centralized bound), so that the noise multiplier the server accounts for is
    the one each client calibrated from its own size.
    """

    def __init__(self, train: TrainSettings) -> None:
        if train.dp is None:
            raise ValueError("DPLedger needs train.dp (privacy=dp_sgd)")
        self.train, self.dp, self.delta = train, train.dp, train.dp.delta

    def noise_multiplier(self, num_examples: int) -> float:
        """The sigma a client of this size trains with."""
        return dpsgd.noise_multiplier(self.dp, num_examples, self.train.batch_size, self.train.local_steps)

    def epsilon(self, num_examples: int, rounds: int) -> float:
        """The client's epsilon at ``delta`` after ``rounds`` rounds of ``local_steps`` DP-SGD steps."""
        return dpsgd.epsilon(self.dp, num_examples, self.train.batch_size, self.train.local_steps, rounds)

    def describe(self, sizes: Sequence[int]) -> str:
        """The mechanism, its noise multipliers and its budget."""
        sigmas = sorted(self.noise_multiplier(n) for n in sizes)
        sigma = f"{sigmas[0]:.3g}" if sigmas[0] == sigmas[-1] else f"{sigmas[0]:.3g} to {sigmas[-1]:.3g}"
        budget = (f"calibrated per client to epsilon {self.dp.target_epsilon:g} over {self.dp.rounds} rounds"
                  if self.dp.target_epsilon is not None else "as configured")
        return (f"DP-SGD (Opacus, {self.dp.accountant} accountant): per-example clip {self.dp.clip:g}, noise "
                f"multiplier {sigma} {budget}, delta {self.delta:g}")


class ClientDPLedger:
    """The loop's :class:`~fedlora.federation.loop.ClientLevelLedger` for DP-FedAvg: Opacus' accountant.

    The mechanism samples a fixed number ``m`` of clients per round (``fraction_train``), while the
    accountant's sampled Gaussian mechanism assumes each client is included independently at rate
    ``q = m / N`` (Poisson); this is the usual approximation of DP-FedAvg implementations and is said
    in the run's first line.
    """

    def __init__(self, dp: dpsgd.ClientDPSettings, denominator: int) -> None:
        self.dp, self.delta = dp, dp.delta
        self.level = ClientLevel(clip=dp.clip, noise_multiplier=dpsgd.client_noise_multiplier(dp),
                                 denominator=denominator)

    def epsilon(self, rounds: int) -> float:
        """Every client's epsilon after ``rounds`` rounds."""
        return dpsgd.client_epsilon(self.dp, rounds)

    def describe(self) -> str:
        """The mechanism, its noise and its budget."""
        budget = (f"calibrated to epsilon {self.dp.target_epsilon:g} over {self.dp.rounds} rounds"
                  if self.dp.target_epsilon is not None else "as configured")
        return (f"client-level DP (DP-FedAvg): each client's update clipped to {self.dp.clip:g}, every client "
                f"weighing 1/{self.level.denominator}, noise multiplier {self.level.noise_multiplier:.3g} {budget}, "
                f"delta {self.delta:g} ({self.dp.accountant} accountant, sampling rate {self.dp.sample_rate:.3g} "
                "taken as Poisson)")


class PooledTrainer(WorkspaceTrainer):
    """The centralized bound's one learner: every client's training data, the federation's step budget."""

    def __init__(self, key: WorkspaceKey, train: TrainSettings, seed: int, *, clients_per_round: int) -> None:
        super().__init__(key, train, seed)
        self.clients_per_round = clients_per_round

    def num_examples(self, client_id: int) -> int:  # noqa: ARG002 - one learner
        """The size of the pooled training set."""
        return len(self.indices(client_id))

    def indices(self, client_id: int) -> list[int]:  # noqa: ARG002 - one learner
        """The union of every client's partition."""
        return sorted(i for part in self.ws.partitions for i in part)

    def steps(self) -> TrainSettings:
        """As many steps per round as the federation spends: local steps x clients sampled per round."""
        return dataclasses.replace(self.settings, local_steps=self.settings.local_steps * self.clients_per_round)

    def round_seed(self, client_id: int, server_round: int) -> int:  # noqa: ARG002
        """The seed of the round's batches and dropout."""
        return seeds.pooled_training(self.seed, server_round)


class PooledTransport(InMemoryTransport):
    """The centralized bound as a transport: one in-process learner (client 0) at the largest rank."""

    def __init__(self, trainer: PooledTrainer, rank: int, stop: threading.Event | None = None) -> None:
        super().__init__({0: rank}, ClientSide(trainer=trainer), measure=False, stop=stop)
        self.trainer = trainer

    def describe(self, clients: Mapping[int, ClientInfo]) -> str:
        """The learner and its budget."""
        info, t = clients[0], self.trainer
        return (f"centralized bound: one learner at rank {info.rank} on the {info.num_examples} pooled training "
                f"examples, {t.steps().local_steps} steps per round ({t.settings.local_steps} local steps x "
                f"{t.clients_per_round} clients per round), nothing communicated")
