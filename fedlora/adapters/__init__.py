"""Pure adapter math (torch only): key handling, rank padding, stacking, initialisation."""
