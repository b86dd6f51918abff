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
from fedpipe.federation.records import CheckpointState, RoundRow
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

    def save_checkpoint(self, rule: str, global_adapter: GlobalAdapter,
                        previous: GlobalAdapter | None) -> None:
        """Round-numbered tensor files first, then state.json names them: a kill leaves the old one."""
        folder, r = self.checkpoint, global_adapter.round
        files = {}
        for key, adapter in (("global", global_adapter), ("previous", previous)):
            if adapter is not None:
                files[key] = f"{key}-{r}.safetensors"
                write_atomic(folder / files[key],
                             wire.encode(adapter.factors, metadata={"round": str(adapter.round)}))
        state = CheckpointState(round=r, rule=rule, files=files)
        write_atomic(folder / "state.json", state.model_dump_json(indent=2))
        for old in folder.glob("*.safetensors"):
            if old.name not in files.values():
                old.unlink()

    def load_checkpoint(self) -> tuple[CheckpointState, dict[str, GlobalAdapter]]:
        """The state and its global adapters ('global', and 'previous' when there is one)."""
        try:
            state = CheckpointState.model_validate_json((self.checkpoint / "state.json").read_text())
        except ValidationError as e:
            raise FedpipeError(f"{self.checkpoint / 'state.json'}: not a fedpipe checkpoint ({e})") from None
        adapters = {}
        for key, name in state.files.items():
            factors, meta = wire.decode((self.checkpoint / name).read_bytes())
            adapters[key] = GlobalAdapter(factors, round=int(meta["round"]))
        return state, adapters

    def read_rows(self, up_to: int) -> list[dict]:
        return [RoundRow.model_validate(r).model_dump() for r in metrics.read_metrics(self.metrics)
                if r["round"] <= up_to]

    def write_rows(self, rows: list[dict]) -> None:
        metrics.write_metrics(self.metrics, rows)
        metrics.plot_rounds(rows, self.curves)

