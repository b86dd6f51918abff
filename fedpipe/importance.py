"""How much adapting each weight matrix is expected to help: the planner's value per matrix.

A report maps full module names to non-negative scores and says which scorer produced them.
The data-free ``prior`` scorer needs only shapes: it ramps linearly with depth
(score = 1 + layer / (layers - 1)), following AdaLoRA's finding that budget is best spent on
the upper layers; it stands in when no weights or data are available.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedpipe.errors import FedpipeError
from fedpipe.shapes import ModelShapes


class ImportanceReport(BaseModel):
    """Scores per matrix and their provenance."""

    model_config = ConfigDict(extra="forbid")

    scorer: str = Field(description="Name of the scorer that produced the scores.")
    model: str = Field(description="Model the scores belong to.")
    data: str | None = Field(None, description="Data the scores were computed on (None: data-free).")
    scores: dict[str, float] = Field(description="Full module name -> non-negative score.")

    def digest(self) -> str:
        """A short content hash, recorded in the plan."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def normalised(self, names: list[str]) -> dict[str, float]:
        """Scores of `names` scaled to sum to 1 (uniform when all are zero or missing)."""
        raw = {n: max(0.0, self.scores.get(n, 0.0)) for n in names}
        total = sum(raw.values())
        return {n: (v / total if total > 0 else 1 / len(names)) for n, v in raw.items()}


def depth_prior(shapes: ModelShapes) -> ImportanceReport:
    """The data-free prior: later layers score higher (see the module docstring)."""
    span = max(1, shapes.layers - 1)
    return ImportanceReport(
        scorer="prior",
        model=shapes.name,
        scores={m.name: 1.0 + m.layer / span for m in shapes.matrices},
    )


def load_report(path: str | Path) -> ImportanceReport:
    """Read an importance report written as YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise FedpipeError(f"--importance: no such file {path}")
    try:
        return ImportanceReport.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise FedpipeError(f"--importance: {path} is not an importance report ({e})") from None
