"""Aggregation strategies for federated LoRA, one module each (pure torch).

Every class implements :class:`fedlora.core.types.Strategy`; Hydra selects one with
``_target_: strategies.<module>.<Class>`` in ``conf/strategy/<module>.yaml``. Nothing here
imports flwr, hydra, peft or transformers.
"""
