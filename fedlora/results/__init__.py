"""What a run leaves behind: the round records, checkpoints, plots and the cross-run report."""
