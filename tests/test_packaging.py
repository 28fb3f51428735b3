"""A non-editable install works from any directory: conf/ and recipes/ ship in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import QUICK, REPO, SHRINK, read_json, run_dir_of


def test_wheel_runs_quickstart_from_any_directory(tmp_path: Path) -> None:
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True,
                   timeout=300)
    wheel = next(wheels.glob("finetune-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    # The wheel's copy comes first on the path; its dependencies come from this environment.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import finetune.locations as c; "
                            "print(c.CONF_DIR); print(c.RECIPES_DIR)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.split() == [str(target / "finetune" / "conf"),
                                    str(target / "finetune" / "recipes")]
    # sweep=optuna's sweeper ships where Hydra discovers plugins, and composes from the wheel
    assert (target / "hydra_plugins" / "finetune_optuna" / "optuna_sweeper.py").is_file()
    plugin = subprocess.run([sys.executable, "-m", "finetune", "sweep=optuna", "--cfg", "hydra",
                             "-p", "hydra.sweeper._target_"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert plugin.stdout.strip() == \
        "hydra_plugins.finetune_optuna.optuna_sweeper.FinetuneOptunaSweeper", plugin.stderr
    result = subprocess.run([sys.executable, "-m", "finetune", *QUICK, *SHRINK],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(result)
    assert run.is_relative_to(elsewhere / "outputs")
    manifest = read_json(run / "manifest.json")
    assert manifest["recipe"]["file"] == str(target / "finetune" / "recipes" / "quickstart.yaml")
