"""Mutation score: break one line at a time and check that some test fails.

Each mutant replaces one exact piece of the source with a broken version (a defence
removed, a sign flipped, a term dropped), runs the tests named beside it, and restores the
file. A mutant is *killed* when a test fails; one that *survives* is a feature no test guards.

    python bench/mutants.py            # every mutant, a table and the score
    python bench/mutants.py 3 7        # only these (by number)

The figures go to BENCHMARKS.md (section "Mutation score").
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what it breaks, file, the exact text, its broken version, the tests to run)
MUTANTS: list[tuple[str, str, str, str, str]] = [
    ("no_decay misses LayerNorm/GroupNorm", "finetune/training/optim.py",
     "NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,",
     "NORM_LAYERS = (nn.modules.batchnorm._NormBase,) or (", "tests/test_optim.py"),
    ("feature-cache key without the tensors' hash", "finetune/training/feature_cuts.py",
     '"tensors": digest.hexdigest()}', '"tensors": ""}', "tests/test_cache.py"),
    ("leaderboard ranks val/loss highest-first", "finetune/sweeps/leaderboard.py",
     '(lower is better for a loss); jobs without it last, in order."""\n'
     '    sign = 1.0 if metric.endswith("loss") else -1.0',
     '(lower is better for a loss); jobs without it last, in order."""\n    sign = -1.0',
     "tests/test_sweeps.py"),
    ("a recipe source's reuse key ignores recipe_overrides", "finetune/weights/readers.py",
     'composed = subprocess.run([sys.executable, "-m", "finetune", *args, "--cfg", "job",',
     'composed = subprocess.run([sys.executable, "-m", "finetune", args[0], "--cfg", "job",',
     "tests/test_sources.py"),
    ("throughput meter counts the warm-up epoch", "finetune/training/callbacks.py",
     "return self.epochs[1:] or self.epochs", "return self.epochs",
     "tests/test_callbacks.py"),
    ("input-wait share always 0", "finetune/training/callbacks.py",
     "return sum(w for _, _, w in self._steady()) / seconds if seconds > 0 else None",
     "return 0.0", "tests/test_callbacks.py"),
    ("SIGTERM no longer ends a run like Ctrl-C", "finetune/training/run.py",
     "        raise Terminated()", "        return None",
     "tests/test_bad_inputs.py -k sigterm"),
    ("the gate lets any hydra key through", "finetune/compose/gate.py",
     '    walk(hydra, "hydra")\n    return problems', "    return problems",
     "tests/test_gate.py -k 'every_attack or logging_config'"),
    ("alias bombs are built", "finetune/compose/safe_files.py",
     "        _expanded_size(root, where)\n", "", "tests/test_gate.py -k every_attack"),
    ("interpolations of resolvers pass", "finetune/compose/gate.py",
     "    problems += interpolation_problems(value, where, key)\n", "",
     "tests/test_gate.py -k every_attack"),
    ("recipe_overrides reach argv unchecked", "finetune/weights/readers.py",
     "    problems = [p for i, entry in enumerate(overrides)\n"
     '                for p in gate.override_problems(entry, f"weights.recipe_overrides[{i}]")]',
     "    problems = []", "tests/test_gate.py -k where_they_become"),
    ("a run dir's recorded config is not gated", "finetune/compose/prepare.py",
     "    problems = gate.recipe_problems(config, where)  # a recorded config is a recipe",
     "    problems = []",
     "tests/test_gate.py -k rerun"),
    ("a manifest's model description is not gated", "finetune/rundir/manifest.py",
     "        problems = gate.manifest_model_problems(data, where)",
     "        problems = []", "tests/test_use.py -k manifest"),
    ("writes follow symlinks", "finetune/rundir/artifacts.py",
     "    for candidate in [path, *list(path.parents)[:levels]]:", "    for candidate in []:",
     "tests/test_use.py -k link"),
    ("torchvision cache files are not hash-checked", "finetune/weights/readers.py",
     "    if not actual.startswith(prefix) and actual not in trusted_hashes():",
     "    if False:", "tests/test_weights.py -k hash_in_its_name"),
    ("two runs may share a run dir", "finetune/rundir/artifacts.py",
     "        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))",
     "        pass", "tests/test_bad_inputs.py -k share"),
    ("run dirs have no suffix", "conf/config.yaml",
     "${now:%Y-%m-%d_%H-%M-%S}-${run_suffix:}   #", "${now:%Y-%m-%d_%H-%M-%S}   #",
     "tests/test_bad_inputs.py -k share"),
    ("a tampered source run is reused", "finetune/weights/readers.py",
     "    if _is_complete(run_dir) and _source_verified(run_dir, key):",
     "    if _is_complete(run_dir):", "tests/test_train_e2e.py -k record"),
    ("planted features are read", "finetune/training/feature_cache.py",
     "        if expected is None or file_sha256(path) != expected:", "        if False:",
     "tests/test_cache.py -k record"),
    ("a wrong-sized classifier from surgery passes the plan", "finetune/training/plan.py",
     "    if plan.class_names is not None and outputs != [len(plan.class_names)]:",
     "    if False:", "tests/test_config.py -k correction"),
    ("freeze.bn=affine freezes the BatchNorm weights too", "finetune/training/freezing.py",
     "            policy.trains_affine and holder in bn_modules)",
     "            False and holder in bn_modules)", "tests/test_freezing.py"),
    ("an unfreeze phase adds the start's groups again", "finetune/training/freeze_schedule.py",
     "[g for g in self.groups if g.stage == index]", "[g for g in self.groups if g.stage == 0]",
     "tests/test_freeze_training.py"),
    ("the linear warm-up is skipped", "finetune/training/optim.py",
     "            if epoch < self.warmup:\n", "            if False:\n", "tests/test_optim.py"),
    ("a data format's root is not checked before reading", "finetune/data/formats.py",
     "        if not self.needs_root:\n            return []",
     "        if True:\n            return []", "tests/test_train_e2e.py -k together"),
    ("a run refused before it trained leaves its dir", "finetune/rundir/artifacts.py",
     "    if not run_dir.is_dir() or run_dir.is_symlink() or not (run_dir / \".hydra\").is_dir():"
     "\n        return False", "    if True:\n        return False",
     "tests/test_use.py -k in_process"),
    ("a sweep job keeps checkpoints", "finetune/training/run.py",
     'return ("none" if sweep else "last") if keep == "auto" else keep',
     'return "last" if keep == "auto" else keep', "tests/test_train_e2e.py -k policy"),
    ("third-party noise is shown at log_level=info", "finetune/training/quiet.py",
     '    if level == "debug":\n', "    if True:\n", "tests/test_train_e2e.py -k own_unless"),
    # the bad-input issue (20)
    ("16-bit images are clipped to white again", "finetune/data/images.py",
     '    if image.mode in ("I", "F") or image.mode.startswith("I;16"):',
     "    if False:", "tests/test_images.py"),
    ("the pixel limit is not checked", "finetune/data/images.py",
     "                if width * height > max_pixels:", "                if False:",
     "tests/test_images.py tests/test_use.py -k 'oversized or unreadable or decode'"),
    ("NaN weights load silently", "finetune/weights/loading.py",
     "    check_finite(model, report)\n", "", "tests/test_bad_inputs.py -k non_finite_weights"),
    ("metrics.json holds a bare NaN", "finetune/rundir/artifacts.py",
     "    text = json.dumps(finite_or_null(obj),", "    text = json.dumps(obj,",
     "tests/test_bad_inputs.py -k non_finite_final"),
    ("a resume checkpoint's optimizer state is not checked", "finetune/training/resume.py",
     '    mismatch = optimizer_state_problem(saved["optimizer_states"], module, stages)',
     "    mismatch = None", "tests/test_fuzz.py -k resume"),
    ("a last batch of one image is kept", "finetune/data/datamodule.py",
     "                          drop_last=drop_last,", "                          drop_last=False,",
     "tests/test_bad_inputs.py -k last_batch"),
    ("an unreadable job stops the leaderboard", "finetune/sweeps/leaderboard.py",
     "    try:\n        return _read_job(job_dir)\n    except Exception as err:",
     "    try:\n        return _read_job(job_dir)\n    except ZeroDivisionError as err:",
     "tests/test_sweeps.py -k unreadable"),
    ("augmentations are not tried at plan time", "finetune/data/datamodule.py",
     "    if augment:\n        check_augment(", "    if False:\n        check_augment(",
     "tests/test_bad_inputs.py -k crashed_in_training"),
    # the most-asked-for options (issue 18)
    ("a resume takes the checkpoint's early-stopping patience", "finetune/training/callbacks.py",
     "        super().load_state_dict(state_dict)\n        self.patience = patience",
     "        super().load_state_dict(state_dict)", "tests/test_stopping.py -k resumes"),
    ("loss.class_weights never reach the loss", "finetune/tasks/classification.py",
     "return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)",
     "return F.cross_entropy(logits, target, weight=None, label_smoothing=label_smoothing)",
     "tests/test_imbalance.py -k lift"),
    ("data.sampler=balanced draws uniformly", "finetune/data/datamodule.py",
     "            weights = [1.0 / counts[label] for label in self.train_set.labels]",
     "            weights = None", "tests/test_imbalance.py -k reaches_the_loader"),
    ("data.mix never mixes a training batch", "finetune/training/lightning_module.py",
     "        if self.mix is not None:  # MixUp", "        if False:  # MixUp",
     "tests/test_module.py -k mixed"),
    ("every k-fold validates on the first fold", "finetune/data/splits.py",
     "np.zeros(len(split.labels)), split.labels))[fold]",
     "np.zeros(len(split.labels)), split.labels))[0]", "tests/test_kfold.py -k disjoint"),
    ("the fold table ranks by the last fold, not the mean", "finetune/sweeps/leaderboard.py",
     "        mean = sum(values) / len(values) if values else None",
     "        mean = values[-1] if values else None", "tests/test_kfold.py -k leaderboard"),
    ("the EMA starts at epoch 0 whatever model.ema.start_epoch", "finetune/training/callbacks.py",
     "        return step_idx is not None and self._epoch >= self.start_epoch",
     "        return step_idx is not None", "tests/test_ema.py -k trajectory"),
    ("validation before the first EMA update sees the untrained copy",
     "finetune/training/callbacks.py",
     "        if self.updates():\n            super().on_validation_epoch_start(",
     "        if True:\n            super().on_validation_epoch_start(",
     "tests/test_ema.py -k trajectory"),
    ("multilabel predict ignores the tuned thresholds", "finetune/tasks/multilabel.py",
     "cut = torch.tensor([float(recorded.get(c, 0.5)) for c in classes])",
     "cut = torch.tensor([float({}.get(c, 0.5)) for c in classes])",
     "tests/test_multilabel.py -k predicts"),
    ("the multilabel loss drops pos_weight", "finetune/tasks/multilabel.py",
     "return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)",
     "return F.binary_cross_entropy_with_logits(logits, target, pos_weight=None)",
     "tests/test_module.py -k multilabel"),
    ("a ViT's position embedding is skipped, not resampled", "finetune/weights/loading.py",
     "        if prefix is not None:\n            old, new =",
     "        if False:\n            old, new =",
     "tests/test_timm.py -k 'position_embedding'"),
    ("the tokens before a ViT's blocks train when the blocks are frozen",
     "finetune/training/freezing.py",
     "        if children.index(parts[depth]) > 0:\n            held.add(ancestor)",
     "        if False:\n            held.add(ancestor)",
     "tests/test_timm.py -k tokens_before"),
    ("a replaced blob in the Hub cache is read", "finetune/weights/readers.py",
     "    hub.check_blob(path, what)\n", "", "tests/test_timm.py -k replaced_blob"),
    ("model.kwargs that make a builder load weights reach the builder",
     "finetune/models/builder.py",
     "        if loads:  # weights come from weights.source: checked and reported\n",
     "        if False:\n",
     "tests/test_timm.py -k refused_together"),
    ("layer decay ignores timm's grouping", "finetune/training/optim.py",
     "    grouped = timm_layers(model)\n    if grouped is not None:\n        return grouped\n",
     "", "tests/test_timm.py -k layer_decay"),
    ("timm weights keep torchvision's preprocessing", "finetune/models/backbones.py",
     "        prep = timm_preprocessing(weights, image_size)",
     "        prep = Preprocessing(image_size or 224, image_size or 224, list(IMAGENET_MEAN), "
     "list(IMAGENET_STD))", "tests/test_timm.py -k hub_cache"),
    ("report.html puts a run dir's text in unescaped", "finetune/rundir/html_report.py",
     '    return html.escape("" if value is None else str(value), quote=True)',
     '    return "" if value is None else str(value)',
     "tests/test_report_html.py -k hostile"),
    ("report.html uses any thumbnail URI", "finetune/rundir/html_report.py",
     "    if not uri or not _PNG_URI.fullmatch(uri):", "    if not uri:",
     "tests/test_report_html.py -k hostile"),
    ("predict ignores the fitted temperature", "finetune/tasks/classification.py",
     "top = torch.softmax(logits / temperature, dim=1).topk(k, dim=1)",
     "top = torch.softmax(logits, dim=1).topk(k, dim=1)",
     "tests/test_evaluation.py -k calibrates"),
    ("eval.checkpoint=best evaluates the last weights", "finetune/training/save.py",
     "        if best is not None and best.state is not None:",
     "        if False:", "tests/test_evaluation.py -k best_weights"),
    ("a test/ folder is ignored", "finetune/data/formats.py",
     '        test = scan_folder(splits["test"], names, subset=True)[0] if "test" in splits '
     "else None",
     "        test = None", "tests/test_evaluation.py -k image_folder_with"),
    ("the ECE uses 10 bins, not 15", "finetune/rundir/evaluation.py",
     '    ece = float(MulticlassCalibrationError(k, n_bins=bins, norm="l1")(probs, labels))',
     '    ece = float(MulticlassCalibrationError(k, n_bins=10, norm="l1")(probs, labels))',
     "tests/test_evaluation.py -k ece"),
    ("the decoded-image cache key ignores a file's modification time",
     "finetune/data/decoded_cache.py",
     '        digest.update(f"{path}\\0{stat.st_size}\\0{stat.st_mtime_ns}\\n".encode())',
     '        digest.update(f"{path}\\0{stat.st_size}\\n".encode())',
     "tests/test_decoded.py -k key_follows"),
    ("a decoded array is read without its record's sha256", "finetune/data/decoded_cache.py",
     '    if entry.get("shape") != [count, *shape] or entry.get("sha256") != '
     'artifacts.file_sha256(',
     '    if entry.get("shape") != [count, *shape] or False and artifacts.file_sha256(',
     "tests/test_decoded.py -k key_follows"),
    ("SQLite transactions no longer take the write lock first (trials claimed twice)",
     "finetune/sweeps/study.py",
     '            if url.startswith("sqlite"):\n'
     "                _serialize_sqlite(storage.engine)\n",
     "", "tests/test_study.py -k 'claims and sqlite'"),
    ("a joining process adds its own n_trials to the study", "finetune/sweeps/study.py",
     "        budget = int(study.user_attrs.get(BUDGET, 0))",
     "        budget = 0", "tests/test_study.py -k sweep_dirs"),
    ("a crashed process's trial is never failed", "finetune/sweeps/optuna_sweeper.py",
     "                studies.fail_stale(study)\n", "", "tests/test_study.py -k crashed"),
    ("the pruner is asked but never obeyed", "finetune/sweeps/pruning.py",
     "                prune = epoch + 1 < self.max_epochs and self.trial.should_prune()",
     "                prune = False", "tests/test_study.py -k cannot_learn"),
    ("a storage URL with a password passes", "finetune/sweeps/study.py",
     "        if url.password:", "        if False:", "tests/test_study.py -k storage_settings"),
    ("a recipe may name the study's storage", "finetune/compose/gate.py",
     '    "sweep.storage": "it names the database', '    "sweep.storage_": "it names the database',
     "tests/test_study.py -k recipe_cannot"),
    ("a job never starts from a shallower job's stored features",
     "finetune/training/feature_cache.py",
     "        for point in reversed(points):  # the deepest cut whose features are stored",
     "        for point in points[-1:]:", "tests/test_cache.py -k deeper_job"),
    ("a sweep's other split points are not kept on the way", "finetune/training/feature_cache.py",
     "        found = {split_bottleneck(prefix, self.points, s) for s in self.splits}",
     "        found = set()", "tests/test_sweeps.py -k every_job"),
    ("a job the launcher cannot start stops the whole sweep process",
     "finetune/sweeps/optuna_sweeper.py",
     "        except Exception as err:  # the launcher lost the jobs (a worker process died)",
     "        except ZeroDivisionError as err:", "tests/test_study.py -k sweep_dirs"),
    ("the search's entry for a key beats the command line's", "finetune/sweeps/optuna_sweeper.py",
     "        space.distributions.pop(key, None)  # one: the command line's the search's\n",
     "", "tests/test_study.py -k grammar"),
    ("a claimed trial has no heartbeat until its job starts", "finetune/sweeps/study.py",
     "                        if storage.get_heartbeat_interval():  # from the first moment: a",
     "                        if False:", "tests/test_study.py -k died_at_once"),
    ("a ViT without a class slot in its position embedding is not resampled",
     "finetune/weights/loading.py",
     '        counts = [0 if getattr(holder, "no_embed_class", False) else declared]',
     "        counts = [declared]", "tests/test_timm.py -k every_vit_prefix"),
    ("the decoded-image cache key ignores the interpolation", "finetune/data/decoded_cache.py",
     '"interpolation": prep.interpolation, "channels": prep.channels,',
     '"channels": prep.channels,', "tests/test_decoded.py -k every_field"),
    ("the decoded-image cache key ignores the channels", "finetune/data/decoded_cache.py",
     '"interpolation": prep.interpolation, "channels": prep.channels,',
     '"interpolation": prep.interpolation,', "tests/test_decoded.py -k every_field"),
    ("the command line does not load the installed plugins", "finetune/compose/prepare.py",
     "    plugins.load()  # installed extensions are choices too\n", "",
     "tests/test_plugins.py -k ddp_ranks"),
    ("a sweep's worker process does not load the installed plugins",
     "finetune/training/plan.py",
     "    plugins.load()  # a sweep's worker process or finetune.train: the tables it may name\n",
     "", "tests/test_plugins.py -k worker"),
    ("a task's evaluation of its splits is skipped", "finetune/training/save.py",
     "    tested = {} if not task.evaluates or", "    tested = {} if True or",
     "tests/test_evaluation.py -k test_split_is_evaluated"),
    ("a sweep imports Lightning before it checks its settings", "finetune/sweeps/callback.py",
     "        os.environ[SPLITS_ENV] = json.dumps(swept_split_points(config))",
     "        import finetune.training.feature_cache  # noqa: F401\n"
     "        os.environ[SPLITS_ENV] = json.dumps(swept_split_points(config))",
     "tests/test_config.py -k do_not_import"),
    ("a plugin planted in the working directory is imported", "finetune/extensions.py",
     "    paths = [p for p in sys.path if p and Path(p).resolve() != here]",
     "    paths = list(sys.path)", "tests/test_plugins.py -k planted"),
    ("a run dir may name a task this machine lacks", "finetune/rundir/manifest.py",
     "        if not isinstance(task, str) or task not in TASKS:",
     "        if not isinstance(task, str):", "tests/test_evaluation.py -k task_must"),
    ("an unknown command goes to train", "finetune/commands/__init__.py",
     '    if args and "=" not in args[0] and not args[0].startswith("-"):', "    if False:",
     "tests/test_config.py -k unknown_command"),
    ("${now:...} formats are not checked", "finetune/compose/gate.py",
     "        if not _NOW_TEXT.fullmatch(_NOW_DIRECTIVE.sub(\"\", fmt)):",
     "        if False:", "tests/test_gate.py -k every_attack"),
    ("dotted keys pass as one literal key", "finetune/compose/gate.py",
     "            if \".\" in key and not _DOTTED_KEYS_ALLOWED.match(path):",
     "            if False:", "tests/test_gate.py -k every_attack"),
    ("builder-loads check reads model.kwargs only as written", "finetune/compose/gate.py",
     "    kwargs = schema.nest(key, value).get(\"model\", {})",
     "    kwargs = {\"kwargs\": value} if key == \"model.kwargs\" else {}",
     "tests/test_gate.py -k every_attack"),
    ("extends and description may interpolate", "finetune/compose/gate.py",
     "        elif key in body and \"${\" in body[key]:", "        elif False:",
     "tests/test_gate.py -k every_attack"),
    ("the resolved run dir is not checked", "finetune/compose/run_dirs.py",
     "    if path == base or path.startswith(base + os.sep):", "    if True:",
     "tests/test_gate.py -k resolved"),
    ("the run-dir check is not one of Hydra's callbacks", "conf/config.yaml",
     "    run_dir_check:\n      _target_: finetune.compose.run_dirs.RunDirCheck\n", "",
     "tests/test_gate.py -k resolved"),
    ("weights.revision takes any text", "finetune/compose/ranges.py",
     "        if value is not None and not form.fullmatch(str(value)):",
     "        if False:", "tests/test_gate.py -k glob_on"),
    ("a glob() in a sweep is a traceback", "finetune/compose/schema.py",
     "    if isinstance(override._value, Glob):\n        return None\n", "",
     "tests/test_gate.py -k 'every_attack or glob_on'"),
    ("--allow-module mylayers allows mylayersevil", "finetune/compose/allowlist.py",
     '    if any(name.startswith(f"{prefix}.") for prefix in allowed_prefixes()):',
     "    if any(name.startswith(prefix) for prefix in allowed_prefixes()):",
     "tests/test_security.py -k prefix_is_a_module"),
]


def run_mutant(index: int) -> tuple[str, float]:
    _, file, old, new, tests = MUTANTS[index]
    path = ROOT / file
    original = path.read_text()
    if original.count(old) != 1:
        return f"not applied: the text is in {file} {original.count(old)} times", 0.0
    path.write_text(original.replace(old, new))
    started = time.perf_counter()
    try:
        done = subprocess.run(f"{sys.executable} -m pytest -q -x -n 0 -p no:cacheprovider "
                              f"{tests}", shell=True, cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - started
    if done.returncode == 1:
        return "killed", seconds
    if done.returncode == 0:
        return "SURVIVED", seconds
    return f"error (pytest exit {done.returncode})", seconds


def main(argv: list[str]) -> None:
    chosen = [int(a) for a in argv] or list(range(len(MUTANTS)))
    killed = 0
    print(f"{'#':>2}  {'result':<10} {'s':>5}  mutant (tests)")
    for index in chosen:
        result, seconds = run_mutant(index)
        killed += result == "killed"
        what, file, _, _, tests = MUTANTS[index]
        print(f"{index:>2}  {result:<10} {seconds:>5.0f}  {what} [{file}] ({tests})", flush=True)
    print(f"mutation score: {killed}/{len(chosen)} killed")


if __name__ == "__main__":
    main(sys.argv[1:])
