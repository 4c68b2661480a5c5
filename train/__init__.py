"""Training: the generic sharded engine (state, step, checkpoints, data, metrics, loop, plan) and its stages.

Entry points: ``train.loop.run(cfg)`` / ``python -m train.loop``; ``train.plan.plan(stage, cfg, mesh)`` /
``python -m train.plan``; stages register in ``train.stages``. ``neodragon_jax`` never imports this package.
"""
