"""Wire a run's server side from its settings and run the loop over a transport.

Both ways a run is served go through :func:`serve`: the Flower ServerApp (simulation and
deployment) with its Grid transport, and the centralized bound (:func:`run_pooled`) with its pooled
learner in this process. The strategy, the compressor and the workspace are built here, once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from fedlora.config.settings import Settings
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.sampling import sample_size
from fedlora.federation.transport import ClientInfo, Transport
from fedlora.results.recorder import RunRecorder
from fedlora.runtime.training.local import TrainSettings
from fedlora.runtime.training.workspace import get_workspace
from fedlora.serving.runtime import ClientDPLedger, DPLedger, PooledTrainer, PooledTransport, WorkspaceModel


def serve(settings: Settings, transport: Transport, loop: LoopSettings | None = None,
          stop: threading.Event | None = None, train: TrainSettings | None = None) -> dict[str, Any]:
    """Run the federation of ``settings`` over ``transport`` (with ``loop`` instead of its own loop settings).

    ``stop``: the run's stop event (Ctrl-C): the loop raises ``RunInterrupted`` at its next safe point.
    ``train``: what the clients train with, when not ``settings.train`` (the pooled learner's budget);
    the privacy ledger accounts for it.
    """
    train = train or settings.train
    ws = get_workspace(settings.workspace_key())
    model = WorkspaceModel(ws, settings.run_dir, eval_batch_size=settings.eval_batch_size, seed=settings.seed)
    recorder = RunRecorder(settings.run_dir, tensorboard=settings.logging.tensorboard,
                           wandb=settings.logging.wandb(), config=settings.source)
    compressor = settings.compression.build() if settings.compression else None
    federation = Federation(loop or settings.loop, strategy=settings.strategy.build(), compressor=compressor,
                            transport=transport, model=model, run_dir=settings.run_dir, recorder=recorder,
                            stop=stop, privacy=DPLedger(train) if train.dp is not None else None,
                            client_dp=client_dp_ledger(settings), secure=settings.secure,
                            downlink=settings.downlink.build() if settings.downlink else None)
    return federation.run()


def client_dp_ledger(settings: Settings) -> ClientDPLedger | None:
    """DP-FedAvg's ledger (``privacy=dp_fedavg``): its fixed denominator is the number of clients a round samples."""
    if settings.client_dp is None:
        return None
    loop = settings.loop
    return ClientDPLedger(settings.client_dp, sample_size(loop.num_clients, loop.fraction_train, loop.min_clients))


def run_pooled(settings: Settings, stop: threading.Event | None = None) -> dict[str, Any]:
    """The centralized bound: one learner on the pooled data, the federation's step budget, no Flower."""
    loop = settings.loop
    per_round = sample_size(loop.num_clients, loop.fraction_train, loop.min_clients)
    trainer = PooledTrainer(settings.workspace_key(), settings.train, settings.seed, clients_per_round=per_round)
    # one learner: every round samples it, and it alone is aggregated
    one = dataclasses.replace(loop, fraction_train=1.0, min_clients=1, min_fit_clients=1)
    return serve(settings, PooledTransport(trainer, max(settings.client_ranks()), stop), one, stop, trainer.steps())


def simulated_clients(settings: Settings) -> tuple[Callable[[int], ClientInfo], int]:
    """What each simulated client answers to the hello, and how many to greet to check it.

    A simulated client's rank is the run's rank policy and its examples its partition of the run's
    data (what ``fedlora.flower.client_app.handle_hello`` answers), so the server computes both from
    the workspace it evaluates on; it greets as many clients as a round samples.
    """
    ranks = settings.client_ranks()
    ws = get_workspace(settings.workspace_key())
    loop = settings.loop

    def info(client_id: int) -> ClientInfo:
        return ClientInfo(client_id, ranks[client_id], len(ws.partition(client_id)))

    return info, sample_size(loop.num_clients, loop.fraction_train, loop.min_clients)
