"""The run folder: what it holds, whether it already holds a run, checkpoints in and out.

    runs/NAME/adapter/            peft LoRA folder (PeftModel.from_pretrained(base, this))
    runs/NAME/checkpoint/         state.json + safetensors of the coordinator's global adapters
    runs/NAME/metrics.jsonl       one line per round (`records.RoundRow`)
    runs/NAME/curves.png          eval loss and accuracy per round
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fedpipe import metrics, wire
from fedpipe.atomic import write_atomic
from fedpipe.errors import FedpipeError
from fedpipe.federation.records import CheckpointState, RoundRow, RunFingerprint
from fedpipe.lora import GlobalAdapter


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    def holds_run(self) -> bool:
        return (self.checkpoint / "state.json").is_file()

    def claim(self, resume: bool) -> None:
        """Refuse to overwrite a run that was not asked to be resumed."""
        if self.holds_run() and not resume:
            raise FedpipeError(f"{self.path} already holds a run: pass --resume to continue it, "
                               "or --out for a new folder")

    def save_checkpoint(self, fingerprint: RunFingerprint, global_adapter: GlobalAdapter,
                        previous: GlobalAdapter | None) -> None:
        """Round-numbered tensor files first, then state.json names them, then the old files go:
        a kill at any point leaves a complete checkpoint (the old round's or the new one's)."""
        folder, r = self.checkpoint, global_adapter.round
        files = {}
        for key, adapter in (("global", global_adapter), ("previous", previous)):
            if adapter is not None:
                files[key] = f"{key}-{r}.safetensors"
                write_atomic(folder / files[key],
                             wire.encode(adapter.factors, metadata={"round": str(adapter.round)}))
        state = CheckpointState(round=r, rule=fingerprint.rule, files=files, fingerprint=fingerprint)
        write_atomic(folder / "state.json", state.model_dump_json(indent=2))
        for old in folder.glob("*.safetensors"):
            if old.name not in files.values():
                old.unlink()

    def read_state(self) -> CheckpointState:
        path = self.checkpoint / "state.json"
        try:
            return CheckpointState.model_validate_json(path.read_text())
        except (OSError, ValidationError) as e:
            brief = e.errors()[0]["msg"] if isinstance(e, ValidationError) else e.strerror
            raise FedpipeError(f"{path.resolve()}: not a readable fedpipe checkpoint ({brief}); "
                               f"{self._last_good()}") from None

    def load_checkpoint(self) -> tuple[CheckpointState, dict[str, GlobalAdapter]]:
        """The state and its global adapters ('global', and 'previous' when there is one)."""
        state = self.read_state()
        adapters = {}
        for key, name in state.files.items():
            path = self.checkpoint / name
            try:
                factors, meta = wire.decode(path.read_bytes())
                adapters[key] = GlobalAdapter(factors, round=int(meta["round"]))
            except (OSError, FedpipeError, KeyError, ValueError) as e:
                raise FedpipeError(f"{path.resolve()}: round {state.round}'s checkpoint cannot be read "
                                   f"({e}); {self._last_good()}") from None
        return state, adapters

    def _last_good(self) -> str:
        try:
            rounds = [r["round"] for r in metrics.read_metrics(self.metrics)]
        except (ValueError, KeyError, TypeError):
            rounds = []
        last = f"metrics.jsonl records rounds up to {max(rounds)}" if rounds else "no round was recorded"
        return f"{last}; restore the file or start a new run with --out"

    def read_rows(self, up_to: int) -> list[dict]:
        try:
            return [RoundRow.model_validate(r).model_dump(mode="json")
                    for r in metrics.read_metrics(self.metrics) if r["round"] <= up_to]
        except (ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            raise FedpipeError(f"{self.metrics.resolve()}: not readable as fedpipe metrics ({str(e)[:200]}); "
                               "restore the file or start a new run with --out") from None

    def write_rows(self, rows: list[dict]) -> None:
        metrics.write_metrics(self.metrics, rows)
        metrics.plot_rounds(rows, self.curves)

