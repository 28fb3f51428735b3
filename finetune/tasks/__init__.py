"""Tasks: what differs between kinds of labels (one class per image, label sets, ...) — how
labels are read, the loss, the metrics, what predict returns, what export says. The table is
finetune/tasks/table.py; nothing outside this folder branches on a task's name."""
