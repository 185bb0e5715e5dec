"""Evaluation: seeded task generators (`tasks`), metrics (`metrics`), the sweep / fidelity-study runner
(`runner`, CLI `squeeze-jax eval`), markdown reports (`report`) and plots (`plots`).

The runner is not imported here so that `python -m squeeze_jax.eval.runner` runs it as a fresh module.
"""

from squeeze_jax.eval import metrics, tasks

__all__ = ["metrics", "tasks"]
