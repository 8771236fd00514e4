r"""Clients that take part when they can, with probabilities the server does not know, and FedAU's weights.

Two participation models (the ``participation`` config group):

* ``uniform`` (the default): the server samples ``fraction_train`` of the clients every round, every
  client with the same, known chance (:func:`fedlora.federation.sampling.sample_clients`).
* ``bernoulli``: client ``k`` takes part in each round independently with probability ``p_k``, as a
  phone that trains only when charging and on Wi-Fi; ``fraction_train`` and ``min_clients`` do not
  apply and a round may have no client at all. The ``p_k`` are ``probabilities[k % len(probabilities)]``
  when given (fixed tiers, as ``ranks.tiers``), else drawn once per run from
  ``Beta(mean * concentration, (1 - mean) * concentration)``, clipped to ``[minimum, 1]``.

Under Bernoulli participation plain averaging over the participants optimises
:math:`\sum_k p_k f_k` rather than the federation's objective :math:`\frac1N \sum_k f_k`: a client
that is online more often pulls the model towards its own data. FedAU (Wang & Ji, "A Lightweight
Method for Tackling Unknown Participation Statistics in Federated Averaging", ICLR 2024) reweights
without knowing ``p_k``: the server counts, per client, the rounds between its participations and
weighs its update by the mean interval :math:`\omega_k` (an online estimate of :math:`1/p_k`), with

.. math:: x \leftarrow x + \frac1N \sum_{k \in S_t} \omega_k \Delta_k ,

dividing by the federation's size ``N``, not by the participants' number. The bookkeeping, as in the
authors' code (IBM/fedau): a participating client's weight is the mean of its recorded intervals (1
before it has any), computed *before* the current interval (rounds since its last participation,
plus one) is appended; an absent client's counter grows, and at the cutoff ``K`` the interval ``K``
is recorded and the counter restarts, so the weight stays bounded: :math:`E[\omega_k] \to
(1 - (1 - p_k)^K) / p_k`.

Choices this platform makes where the paper speaks of plain vectors:

* *participating* is a reply that passed the server's checks in that round (a client that was
  online but failed, or whose update was rejected, did not take part);
* the paper's ``1/N`` is the weight each client would have if all took part; fedlora uses the
  strategy's own full-participation weight :math:`w_k`: :math:`1/N` under ``strategy.weighting=uniform``
  (the paper's rule exactly), :math:`n_k / \sum_{j=1}^N n_j` under ``examples`` (every client's
  example count is known from when it connected). Then :math:`\sum_{k \in S_t} \omega_k w_k \Delta_k`
  estimates the full federation's :math:`\sum_k w_k \Delta_k` without bias, as in the paper, and the
  objective is the one the strategy states (the example-weighted one, which the pooled test set
  measures, by default);
* the rule is applied to the LoRA strategies through their own aggregate: each update is rescaled
  about its start, :math:`x_k' = x_k^0 + c_k (x_k - x_k^0)` with :math:`c_k = \omega_k w_k / p_k` and
  :math:`p_k` the strategy's weight over the participants, so a strategy whose aggregate is the
  :math:`p_k`-weighted mean of its updates (FedAvg with zero-padding, FFA-LoRA, RoLoRA) returns
  exactly :math:`x + \sum \omega_k w_k \Delta_k`. FLoRA's clients start fresh factors with ``B = 0``
  and its merge is :math:`\sum p_k s B_k A_k`, so scaling ``B`` (and the head's change), not ``A``,
  gives exactly :math:`\sum \omega_k w_k s B_k A_k`. A strategy that aggregates the clients' products
  ``B_k A_k`` of continuing factors (FlexLoRA, FedEx-LoRA, LoRA-FAIR) has no such rescaling, and is
  refused;
* the state is a pure function of which clients took part in which round, so a resumed run rebuilds
  it from ``metrics.jsonl`` and computes what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedlora.core import lora_math as lm
from fedlora.core import seeds
from fedlora.core.types import AdapterState, ClientUpdate

MODELS = ("uniform", "bernoulli")


@dataclass(frozen=True)
class ParticipationSettings:
    """The ``participation`` config group (see the module docstring)."""

    model: str = "uniform"
    probabilities: tuple[float, ...] = ()  # bernoulli: client k's is probabilities[k % len]; empty: drawn
    mean: float = 0.2  # of the drawn probabilities (before clipping to [minimum, 1])
    concentration: float = 2.0  # Beta(mean * c, (1 - mean) * c): smaller is more spread
    minimum: float = 0.02  # no client is online less often than this
    fedau: bool = False  # FedAU's weights (module docstring)
    fedau_cutoff: int = 50  # K: the longest interval FedAU records

    @property
    def bernoulli(self) -> bool:
        """Whether clients take part on their own (``model=bernoulli``)."""
        return self.model == "bernoulli"

    def client_probabilities(self, client_ids: Iterable[int], seed: int) -> dict[int, float]:
        """Each client's probability of taking part in a round (``bernoulli``), fixed for the run.

        Drawn probabilities are drawn in client order from a generator of the run seed, so every run
        with the same seed, and every resume, has the same ones.
        """
        ids = sorted(client_ids)
        if self.probabilities:
            return {cid: float(self.probabilities[cid % len(self.probabilities)]) for cid in ids}
        rng = seeds.participation_probabilities(seed)
        a, b = self.mean * self.concentration, (1.0 - self.mean) * self.concentration
        return {cid: min(1.0, max(self.minimum, rng.betavariate(a, b))) for cid in ids}

    def describe(self, probabilities: Mapping[int, float], num_clients: int) -> str:
        """The model and FedAU in a few words, for the run's first line (empty for the default)."""
        parts = []
        if self.bernoulli and probabilities:
            values = sorted(probabilities.values())
            parts.append(f"participation: each client on its own, with a probability the server does not know "
                         f"(mean {sum(values) / len(values):.3f}, from {values[0]:.3f} to {values[-1]:.3f}; "
                         "fraction_train and min_clients do not apply)")
        if self.fedau:
            parts.append(f"FedAU weights (each client's mean participation interval, cutoff {self.fedau_cutoff}, "
                         f"times its weight among all {num_clients} clients)")
        return "; ".join(parts)


def participants(probabilities: Mapping[int, float], server_round: int, seed: int) -> list[int]:
    """The clients that take part in round ``server_round`` (sorted): one draw per client, in client order."""
    rng = seeds.participation(seed, server_round)
    return [cid for cid in sorted(probabilities) if rng.random() < probabilities[cid]]


class FedAUWeights:
    """FedAU's bookkeeping on the server: per client, the rounds since it last took part and its intervals.

    Only the sum and the number of recorded intervals are kept (their mean is the weight), so the
    state is three integers per client.
    """

    def __init__(self, client_ids: Iterable[int], cutoff: int) -> None:
        if cutoff < 1:
            raise ValueError(f"participation.fedau_cutoff={cutoff} must be an integer >= 1")
        self.cutoff = cutoff
        self.absent = dict.fromkeys(sorted(client_ids), 0)
        self.interval_sum = dict.fromkeys(self.absent, 0)
        self.intervals = dict.fromkeys(self.absent, 0)

    @classmethod
    def replay(cls, client_ids: Iterable[int], cutoff: int,
               history: Iterable[Collection[int]]) -> FedAUWeights:
        """The state after the rounds of ``history`` (each round's participants, in round order)."""
        weights = cls(client_ids, cutoff)
        for took_part in history:
            weights.record(took_part)
        return weights

    def weight(self, client_id: int) -> float:
        """``omega_k``: the mean of client ``client_id``'s recorded intervals, 1 before it has one."""
        n = self.intervals[client_id]
        return self.interval_sum[client_id] / n if n else 1.0

    def record(self, took_part: Collection[int]) -> None:
        """Count one round in which the clients in ``took_part`` took part (after their weights were read)."""
        for cid in self.absent:
            if cid in took_part:
                self.interval_sum[cid] += self.absent[cid] + 1
                self.intervals[cid] += 1
                self.absent[cid] = 0
            else:
                self.absent[cid] += 1
                if self.absent[cid] >= self.cutoff:
                    self.interval_sum[cid] += self.absent[cid]
                    self.intervals[cid] += 1
                    self.absent[cid] = 0


def rescale(update: ClientUpdate, start: AdapterState, factor: float, *, keep_lora_a: bool) -> ClientUpdate:
    """``update`` with every tensor's change from ``start`` multiplied by ``factor``.

    ``keep_lora_a`` leaves the ``lora_A`` factors as trained: for fresh factors with ``B`` starting
    at zero, scaling ``B`` alone scales the product ``B A`` exactly.
    """
    state = {}
    for key, value in update.state.items():
        if keep_lora_a and lm.is_lora_a_key(key):
            state[key] = value
        else:
            base = start[key]
            state[key] = base + (value - base) * factor
    return ClientUpdate(update.client_id, update.rank, update.scaling, update.num_examples, state)


def full_weights(weighting: str, num_examples: Mapping[int, int]) -> dict[int, float]:
    """``w_k``, each client's weight if every client took part: ``1/N`` (``uniform``) or ``n_k / sum_j n_j``."""
    ids = list(num_examples)
    return dict(zip(ids, lm.participant_weights(weighting, [num_examples[c] for c in ids]), strict=True))


def fedau_factors(omegas: Sequence[float], full: Sequence[float], strategy_weights: Sequence[float]) -> list[float]:
    """``c_k = omega_k w_k / p_k``: the rescaling that turns a ``p_k``-weighted mean into FedAU's sum.

    A client the strategy gives no weight (no examples) gets ``c_k = 0``: it contributes nothing either way.
    """
    return [o * w / p if p > 0 else 0.0 for o, w, p in zip(omegas, full, strategy_weights, strict=True)]


def expected_weight(p: float, cutoff: float) -> float:
    """FedAU's limit :math:`E[\\omega] = (1 - (1 - p)^K) / p` for a client online with probability ``p``."""
    return (1.0 - (1.0 - p) ** cutoff) / p if cutoff != float("inf") else 1.0 / p

