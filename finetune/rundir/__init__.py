"""The run dir: its files (written atomically), the manifest, plots, report.html, and what
reads a run dir back: inference, export, evaluation."""
