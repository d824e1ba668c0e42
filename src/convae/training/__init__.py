"""Training: the step and the epoch loop (``loop``), epochs with validation, state and resume (``fit``), the
recipe's parts, the training modes (``supervised``; ``joint``: plain and the Gamma-model; ``consistency``:
FixMatch, FlexMatch and FreeMatch), the pretraining and fine-tuning phases, and one run's data. Importing it
registers the training modes, the default first.
"""

# isort: off
from . import supervised  # noqa: F401  (registers --joint off, the default)
from . import joint  # noqa: F401  (registers --joint plain and gamma)
from . import consistency  # noqa: F401  (registers --joint fixmatch, flexmatch and freematch)
# isort: on
