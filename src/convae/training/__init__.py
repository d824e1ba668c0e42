"""Training: the step and the epoch loop (``loop``), epochs with validation, state and resume (``fit``), the
recipe's parts, joint (semi-supervised) training, the pretraining and fine-tuning phases, and one run's data."""
