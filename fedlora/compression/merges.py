r"""Downlink compression of base merges: a truncated SVD with the server's error feedback.

A strategy whose clients start fresh LoRA factors every round (FLoRA) sends no start adapter worth
compressing: its downlink is its **base merges**, one factored update ``B_st A_st`` a round whose rank
``R = sum_k r_k`` grows with the number of clients sampled, so each message carries ``R (m + n)``
numbers per module. With ``downlink=svd`` the server sends, each round, the best rank-``q``
approximation of the merge plus what earlier rounds left out:

.. math::

    T_t = B_{st} A_{st} + E_t, \qquad T_t = U S V^\top, \qquad
    \hat M_t = (U_q S_q)(V_q^\top), \qquad E_{t+1} = T_t - \hat M_t,

per module (:func:`fedlora.core.lora_math.truncate_merge`; ``q`` is at most the numerical rank of the
largest ``T``, the same for every module, a module with fewer components padded with zeros).
``\hat M_t`` *is* the round's merge:
the server's model and every client's base move by it alone, so all of them hold the same model bit
for bit, and ``\sum_t \hat M_t + E_{T+1} = \sum_t B_{st,t} A_{st,t}``: compression delays what it drops
and loses nothing but the last residual (error feedback on the server, as EF21 does on the downlink:
there is one sender and every client receives the same message, so the residual never goes stale).

Per module and merge, ``q (m + n)`` numbers travel instead of ``R (m + n)``: ``R / q`` less downlink
when every merge reaches every client. The residual ``E`` is dense (``m x n`` per module, on the server
only, in the checkpoint) and ``T`` is formed densely for its SVD: a server cost of ``O(m n min(m, n))``
per module and round: small for MiniLM's 384 x 384 projections; for a 7B model's 4096 x 4096 ones the
dense SVD of every module is the server's main cost each round (not benchmarked yet). Its rank ``q`` is
fixed, so a round's bytes are too; the energy kept (``||M_hat||^2 / ||T||^2``) and the residual's norm
are logged each round.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.core import lora_math as lm
from fedlora.core.types import BaseMerge, Tensor


class MergeSVD:
    """Each round's base merge (plus the carried residual) truncated to rank ``rank`` by its SVD.

    Parameters
    ----------
    rank:
        ``q``: the rank of every merge sent, per module (>= 1).
    """

    compresses_merges = True  # what it compresses: base merges, not a client's start (fedlora.federation.downlink)

    def __init__(self, *, rank: int = 6) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"downlink.rank={rank!r} must be an integer >= 1 (the rank of each merge sent); "
                             "use downlink.rank=6, the value chosen on validation")
        self.rank = rank

    def compress_merge(self, merge: BaseMerge, residual: Mapping[str, Tensor],
                       ) -> tuple[BaseMerge, dict[str, Tensor], dict[str, float]]:
        """The merge to apply and send, the residual to carry, and the round's metrics (``merge_energy_kept``,
        ``merge_residual_fro``, ``merge_rank_sent``)."""
        sent: BaseMerge = {}
        carried: dict[str, Tensor] = {}
        kept_sq = total_sq = 0.0
        for module in sorted(merge):
            pair, carried[module], kept, total = lm.truncate_merge(merge[module], residual.get(module), self.rank)
            sent[module] = pair
            kept_sq, total_sq = kept_sq + kept, total_sq + total
        # one rank for every module (a merge folds into one adapter): zero components where a module has fewer
        q = max(p.a.shape[0] for p in sent.values())
        sent = {k: lm.pad_pair(p.a, p.b, q) for k, p in sent.items()}
        rest = sum(float(e.square().sum()) for e in carried.values())
        metrics = {"merge_energy_kept": kept_sq / total_sq if total_sq > 0 else 1.0,
                   "merge_residual_fro": rest**0.5,
                   "merge_rank_sent": float(max((p.a.shape[0] for p in sent.values()), default=0))}
        return sent, carried, metrics
