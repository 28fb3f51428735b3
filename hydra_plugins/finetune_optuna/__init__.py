"""finetune's Hydra sweeper: an Optuna study shared by every process that names it
(finetune/sweeps/optuna_sweeper.py does the work; this package is only what Hydra discovers)."""
