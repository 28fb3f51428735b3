"""Sweeps: the shared Optuna study, its Hydra sweeper, pruning, the sweep callback and the
leaderboard."""
