"""What a run writes down: one row per round in metrics.jsonl, and the checkpoint's state.json.

Both are pydantic models (unknown keys rejected), so every transport writes the same rows and a
row that drifted from the schema fails where it is made, not in a reader later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerRow(_Strict):
    """One server's round: its configuration, what it measured, and what the plan predicted."""

    server: str
    entry: str = Field(description="The plan entry (hardware class) the server belongs to.")
    bits: int
    batch_size: int
    train_loss: float
    steps: int
    train_s: float
    tokens: int
    memory_gib: float = Field(description="Measured peak of this server's training: the model's bytes "
                              "+ the peak of its working memory (`measure.PeakMemory`: CUDA, the "
                              "allocator's peak; CPU, anonymous memory above a baseline taken after "
                              "the free heap went back to the OS) + in process, the process before "
                              "any model was loaded (the runtime the prediction counts too).")
    predicted_memory_gib: float
    upload_bytes: int = Field(description="Counted on the payload sent, header included.")
    download_bytes: int
    predicted_upload_bytes: float
    predicted_download_bytes: float
    upload_density: float
    download_density: float


class FamilyEvaluation(_Strict):
    """The global model on (part of) the held-out split: `data.evaluate`'s numbers."""

    loss: float = Field(description="Mean cross-entropy over answer tokens (eos included), pooled "
                        "over tokens.")
    accuracy: float | None = Field(description="Exact match of greedy generation; None on rounds "
                                   "that scored the loss only (the accuracy cadence).")
    accuracy_ci95: tuple[float, float] | None = Field(description="Wilson 95% interval of the "
                                                      "accuracy; None with it.")
    n: int = Field(description="Held-out examples scored.")


class Evaluation(FamilyEvaluation):
    """The whole held-out split, and each task family of it."""

    per_family: dict[str, FamilyEvaluation]


class RoundRow(_Strict):
    """One round of the federation: who trained, who missed it and why, the global model's eval."""

    round: int
    rule: str
    cohort: list[str] = Field(default_factory=list, description="The servers sampled to train this "
                              "round; the others are neither missed nor idle.")
    servers: list[ServerRow]
    idle_servers: list[str] = Field(description="Plan members that adapt nothing, so never train.")
    missed_servers: dict[str, str] = Field(description="Member -> why its update is not in this round.")
    evaluated: Literal["nothing", "loss", "loss+accuracy"] = Field(description="What this round "
                                                                     "scored: the eval cadence skips "
                                                                     "rounds, the accuracy cadence "
                                                                     "generation.")
    eval: Evaluation | None = Field(description="`data.evaluate` of the global model; None on rounds "
                                    "the eval cadence skips.")
    learning_rate: float | None = Field(None, description="The servers' learning rate this round "
                                        "(task.lr_schedule; null in rows written before it was recorded).")
    aggregate_s: float
    eval_s: float
    global_rank: int
    truncation: dict[str, float] = Field(description="`aggregators.truncate.cut_metrics` of the round "
                                         "(empty: no truncation).")
    adapter_bytes: int = Field(description="Size of the saved global adapter (adapter_model.safetensors).")
    round_s: float
    train_s: float

    @model_validator(mode="before")
    @classmethod
    def _older_rows(cls, row: object) -> object:
        """Rows written before `evaluated` existed scored the loss and the accuracy, or nothing:
        reading them keeps a run folder of an earlier version resumable."""
        if isinstance(row, dict) and "evaluated" not in row:
            return {**row, "evaluated": "loss+accuracy" if row.get("eval") else "nothing"}
        return row


class RunFingerprint(_Strict):
    """What makes a run that run: a resume with anything else would splice two runs together."""

    plan: str = Field(description="sha256 of the plan file.")
    communication: dict[str, float | str] = Field(description="Density / precision overrides of "
                                                  "every server's plan (empty: the plan's).")
    rule: str
    local_steps: int
    eval_samples: int
    seed: int
    data: str = Field(description="The dataset file's sha256, or its source string.")
    norm_bound: float | None
    clip_norm: float | None
    truncate_energy: float | None
    truncate_rank: int | None
    cohort: int | None = Field(None, description="Servers sampled per round (null: all of them).")
    stratify: bool = False
    error_feedback: bool = Field(True, description="Upload residuals carried to later rounds (rules "
                                 "that keep factor coordinates, in-process).")
    lr_rounds: int | None = Field(None, description="The rounds a decaying learning rate spans "
                                  "(task.lr_schedule; null: constant, so the rounds may grow).")

    def differences(self, other: RunFingerprint) -> list[tuple[str, object, object]]:
        """(field, this value, the other's) for every field that differs."""
        return [(name, getattr(self, name), getattr(other, name)) for name in type(self).model_fields
                if getattr(self, name) != getattr(other, name)]


class CheckpointState(_Strict):
    """state.json: the round the checkpoint holds, the tensor files that make it up, and the
    settings it was made with."""

    round: int
    rule: str
    files: dict[str, str] = Field(description="'global' / 'previous' -> safetensors file name.")
    fingerprint: RunFingerprint
