"""The one-command CPU demo: synthetic data banks, a synthetic teacher, and the runner
(`python -m ease_jax.demo RUN_DIR` writes its report)."""
