"""Layer 1: compressors of client updates, one module each (``_target_`` in ``conf/compression/``)."""
