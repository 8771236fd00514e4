"""From the Hydra config to a run: validation before anything starts, then typed settings built once.

:mod:`fedlora.config.validate` checks the resolved config (a plain dict) and reports every problem
at once, each naming the field, the bad value and the fix; :mod:`fedlora.config.settings` turns a
valid config into frozen dataclasses that the rest of the platform reads (nothing below reads the
config by string).
"""

from pathlib import Path

#: The Hydra config groups (``conf/`` of the checkout).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
