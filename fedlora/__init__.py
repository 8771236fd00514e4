"""fedlora: federated fine-tuning of foundation models with heterogeneous-rank LoRA.

Layers (imports only point downwards):

1. math     ``fedlora.core.types``, ``fedlora.federation.keys``, ``fedlora.adapters``, root ``strategies``: torch only.
2. runtime  ``fedlora.runtime.models``, ``fedlora.runtime.data``, ``fedlora.runtime.training``: transformers, peft, datasets.
3. glue     ``fedlora.flower``, ``fedlora.cli.main``, ``fedlora.results.report``: flwr, hydra, ray.

This file stays import-light so that the math layer can be used without the others.
"""

__version__ = "0.1.0"
