"""fedlora: federated fine-tuning of foundation models with heterogeneous-rank LoRA.

Layers (imports only point downwards):

1. math     ``fedlora.types``, ``fedlora.keys``, ``fedlora.adapters``, root ``strategies``: torch only.
2. runtime  ``fedlora.models``, ``fedlora.data``, ``fedlora.training``: transformers, peft, datasets.
3. glue     ``fedlora.flower``, ``fedlora.main``, ``fedlora.report``: flwr, hydra, ray.

This file stays import-light so that the math layer can be used without the others.
"""

__version__ = "0.1.0"
