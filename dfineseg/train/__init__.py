"""Training: the Trainer loop, EMA, optimizer groups and schedules, checkpoints, distributed helpers.

Importing this package is cheap (no torch). The Python entry point is `dfineseg.api.train(cfg)`, which runs
`dfineseg.train.trainer.Trainer(cfg).fit()`.
"""
