"""The tasks, one small object each, in one table (`TASKS`): `task:` names one.

Adding a task is one class (finetune/tasks/base.py says what it owns) and one entry here, or
an entry point in the group `finetune.tasks` (docs/extending.md). Torch-free.
"""

from __future__ import annotations

from typing import Any

from finetune.extensions import Table
from finetune.tasks.base import Task
from finetune.tasks.classification import Multiclass
from finetune.tasks.detection import Detection
from finetune.tasks.instances import InstanceSegmentation
from finetune.tasks.multilabel import Multilabel
from finetune.tasks.segmentation import Segmentation

DEFAULT = "multiclass"  # a run dir written before the task was recorded

TASKS = Table("task", "finetune.tasks", "task")
TASKS.add(Multiclass(), Multilabel(), Detection(), Segmentation(), InstanceSegmentation())


def task_of(cfg_or_name: Any) -> Task:
    """The task a config (its `task`) or a name is."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.get("task", DEFAULT)
    return TASKS[name]
