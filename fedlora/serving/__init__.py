"""A run's server side assembled from its settings: the runtime behind the loop and the pooled bound.

:mod:`fedlora.serving.runtime` adapts the per-process workspace (model, data) to the loop's protocols;
:mod:`fedlora.serving.run` builds the strategy, the compressor and the loop once and runs it over a
transport (Flower's Grid, or the centralized bound's pooled learner).
"""
