"""Checkpoints of a training run, written so that a crash mid-save loses nothing.

    checkpoints/
      latest                       name of the newest complete checkpoint
      round000012/
        state.json                 round reached, settings, number of processes
        rank0/<block>/t1.00/cond/  trainer.safetensors and buffer.safetensors, per process

A checkpoint folder counts only once `latest` names it, and `latest` is replaced
atomically after every process has finished writing, so an interrupted save leaves the
previous checkpoint in charge.
"""

import json
import os
import shutil
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from core.files import read_safetensors
from core.sae.bank import SAEKey, bank_subfolder
from core.training.distributed import average_gradients
from core.training.trainer import SAETrainer


class Checkpointer:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.state = PartialState()

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "state.json").is_file() else None

    def saved_state(self) -> dict:
        return json.loads((self.latest() / "state.json").read_text())

    def save(self, run) -> Path:
        folder = self.root / f"round{run.next_round:06d}"
        mine = folder / f"rank{self.state.process_index}"
        if mine.exists():
            shutil.rmtree(mine)
        for key, trainer in run.trainers.items():
            trainer.save_checkpoint(mine / bank_subfolder(key))
        for key, buffer in run.buffers.items():
            (mine / bank_subfolder(key)).mkdir(parents=True, exist_ok=True)
            save_file(buffer.state_dict(), str(mine / bank_subfolder(key) / "buffer.safetensors"))
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            state = {
                "next_round": run.next_round,
                "world_size": self.state.num_processes,
                "args": vars(run.config),
                "trained": [list(k) for k in run.trainers],
                "buffered": [list(k) for k in run.buffers],
            }
            (folder / "state.json").write_text(json.dumps(state, indent=2))
            previous = self.latest()
            tmp = self.root / "latest.tmp"
            tmp.write_text(folder.name)
            tmp.replace(self.root / "latest")
            if previous is not None and previous != folder:
                shutil.rmtree(previous, ignore_errors=True)
        self.state.wait_for_everyone()
        run.steps_since_save = 0
        return folder

    def load(self, run) -> None:
        folder = self.latest()
        saved = self.saved_state()
        mine = folder / f"rank{self.state.process_index}"
        for key in map(lambda k: SAEKey(*k), saved["trained"]):
            folder = mine / bank_subfolder(key)
            run.trainers[key] = SAETrainer.from_checkpoint(folder, device=self.state.device)
            run.trainers[key].grad_sync = average_gradients
        for key in map(lambda k: SAEKey(*k), saved["buffered"]):
            tensors = read_safetensors(mine / bank_subfolder(key) / "buffer.safetensors")
            run.buffer(key, tensors["rows"].shape[1]).load_state_dict(tensors)
        run.next_round = saved["next_round"]
