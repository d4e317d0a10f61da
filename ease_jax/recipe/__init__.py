"""The EASE recipe's stages: diagnosis, judges, teachers and traces, the phase-2 mix,
evaluation and scoring, baselines and the comparison report."""
