"""Training: the Trainer loop, EMA, optimizer groups and schedules, checkpoints, distributed helpers.

Importing this package is cheap (no torch); `dfineseg.train(cfg)` calls `dfineseg.api.train`.
"""

from dfineseg._callable import make_module_callable

make_module_callable(__name__, "train")
