"""What a run leaves behind: checkpoints, the hub folder, the run folder and its progress lines, figures and the
report."""
