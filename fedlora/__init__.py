"""fedlora: federated fine-tuning of foundation models with heterogeneous-rank LoRA.

Layers, imports pointing down only (``tests/test_layering.py`` checks every module):

1. math      ``fedlora.core``, ``fedlora.compression``, root ``strategies``: torch, numpy, stdlib.
2. runtime   ``fedlora.runtime`` (transformers, peft, datasets); outputs ``fedlora.results``.
3. the loop  ``fedlora.federation``: the round loop, its transports and wire codec, without Flower.
4. settings  ``fedlora.config`` (validation, typed settings), ``fedlora.serving`` (a run assembled).
5. glue      ``fedlora.flower`` (flwr), ``fedlora.cli`` (hydra): the apps and the commands.

This file stays import-light so that the math layer can be used without the others.
"""

__version__ = "0.1.0"
