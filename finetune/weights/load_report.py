"""The load report (provenance): where the tensors came from and what a weight load did to
every one of them, as JSON (load_report.json) and as a log table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadReport:
    """Provenance of the checkpoint and the fate of each tensor."""

    source: str
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    container: str | None = None  # the key a state dict was found under, e.g. state_dict
    run: dict[str, Any] | None = None  # the run dir a run / recipe source came from
    hub: dict[str, Any] | None = None  # a Hub repo's: repo, revision, commit, file
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_skipped: list[dict[str, Any]] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    head_reset: str | None = None  # why the source's classifier was not loaded

    @property
    def new(self) -> list[str]:
        """Model tensors left newly initialized: missing or shape-skipped."""
        return self.missing + [s["key"] for s in self.shape_skipped]

    def summary(self) -> str:
        total = len(self.loaded) + len(self.new)
        if self.source == "none":
            return f"no pretrained weights: all {total} tensors newly initialized"
        new = ", ".join(self.new[:6]) + (f", ... ({len(self.new)} in all)"
                                          if len(self.new) > 6 else "")
        line = f"loaded {len(self.loaded)}/{total} tensors from {self.source}"
        line += f"; new: {new}" if self.new else ""
        return line + (f"; unused: {len(self.unexpected)}" if self.unexpected else "")

    def table(self) -> str:
        """One row per fate: count and the first keys (shape changes shown)."""
        shapes = [f"{s['key']} {s['checkpoint_shape']}->{s['model_shape']}"
                  for s in self.shape_skipped]
        adapted = [f"{a['key']} {a['checkpoint_shape']}->{a['model_shape']}"
                   + (f" ({a['how']})" if a.get("how") else "") for a in self.adapted]
        renamed = [f"{old}->{new}" for old, new in self.renamed.items()]
        rows = [("loaded", self.loaded), ("adapted", adapted), ("renamed", renamed),
                ("shape-skipped", shapes), ("missing (new)", self.missing),
                ("unexpected (unused)", self.unexpected), ("excluded", self.excluded)]
        lines = [f"  {'fate':<20} {'count':>6}  first keys"]
        for fate, keys in rows:
            if not keys and fate not in ("loaded", "missing (new)"):
                continue
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            lines.append(f"  {fate:<20} {len(keys):>6}  {shown}")
        where = self.url or self.path or ""
        sha = f" sha256 {self.sha256[:16]}..." if self.sha256 else ""
        reset = [f"  {self.head_reset}"] if self.head_reset else []
        return "\n".join([f"weights: {self.summary()}", f"  from {where}{sha}", *reset, *lines])

    def to_dict(self) -> dict[str, Any]:
        counts = {name: len(getattr(self, name)) for name in
                  ("loaded", "missing", "unexpected", "shape_skipped", "adapted", "excluded",
                   "renamed")}
        return {**asdict(self), "counts": counts, "summary": self.summary()}
