"""One unlearning run's settings, and the key that identifies a run (a checkpoint resumes only under the same key)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .data import UnlearnData

# ---------------------------------------------------------------------------------------------
# one step's batch


@dataclass
class TrainConfig:
    method: str
    steps: int
    lr: float
    batch_size: int
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_first_layer: int = 0
    ga_weight: float = 0.5
    mismatch_weight: float = 1.0
    kl_weight: float = 1.0
    npo_beta: float = 0.1
    max_forget_nll: float = 100.0
    checkpoint_every: int = 10
    seed: int = 0

    @classmethod
    def from_params(cls, P: dict, method: str) -> "TrainConfig":
        keys = {k for k in cls.__dataclass_fields__} - {"method"}
        values = {k: P[k] for k in keys if k in P}
        values["lora_targets"] = tuple(values.get("lora_targets", cls.lora_targets))
        return cls(method=method, **values)

    def key(self, data: UnlearnData, model: str) -> str:
        """Identity of a run: the model preset, every setting and the data. A checkpoint resumes, and a finished
        run is reused, only under the same key (so a 13B run never picks up a 7B adapter from the same folder)."""
        blob = json.dumps({"model": model, "config": asdict(self), "forget": data.forget, "normal": data.normal,
                           "mismatch": data.mismatch_answers}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
