"""The plugin package of the plugin tests: a data format of stripes, a task and a schedule,
installed beside finetune as pip would (tests/test_plugins.py, and the DDP run of
tests/test_ddp.py, whose ranks must find it)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

# The plugin package: what `pip install` leaves in site-packages (the module and its
# dist-info with entry_points.txt), written by hand so the test needs no build backend.
PLUGIN = '''
"""finetune_stripes: a data format of stripes, a task and a schedule, from outside finetune."""

from finetune.data.formats import DataFormat
from finetune.tasks.classification import Multiclass
from finetune.training.schedules import LRShape


class Stripes(DataFormat):
    """Two classes of 16 in-memory images each: vertical or horizontal stripes."""

    name = "stripes"

    def class_names(self, cfg):
        return ["vertical", "horizontal"]

    def read(self, cfg, crop, seed):
        import torch

        from finetune.data.splits import Split

        line = (torch.arange(crop) % 4 < 2).to(torch.uint8) * 255
        vertical = line.expand(crop, crop)
        images = torch.stack([vertical, vertical.t()] * 16)[:, None].expand(-1, 3, -1, -1)
        return Split(images.contiguous(), [0, 1] * 16), None, ["vertical", "horizontal"]


class Binary(Multiclass):
    """One of two classes: a task of its own name (its figures are multiclass's)."""

    name = "binary"


class Linear(LRShape):
    name = "linear"

    def factor(self, s, t):
        return max(0.0, 1.0 - t / (s.epochs - s.warmup))
'''

ENTRY_POINTS = """
[finetune.data_formats]
stripes = finetune_stripes:Stripes

[finetune.tasks]
binary = finetune_stripes:Binary

[finetune.schedules]
linear = finetune_stripes:Linear
"""

RECIPE = """
# @package _global_
description: stripes from a plugin
model: {name: resnet18}
weights: {source: none}
data: {name: stripes, image_size: 32, val_fraction: 0.25, batch_size: 8}
task: binary
sched: {name: linear}
"""


def install(site: Path, entry_points: str = ENTRY_POINTS, name: str = "finetune_stripes"
            ) -> dict[str, str]:
    """The plugin in `site` as pip installs one; the environment that puts it on the path."""
    site.mkdir(exist_ok=True)
    (site / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site),
                                                      os.environ.get("PYTHONPATH")) if p)}
