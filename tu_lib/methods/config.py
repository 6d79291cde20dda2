"""One unlearning run's settings, and the key that identifies a run (a checkpoint resumes only under the same key)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .data import UnlearnData

# The defaults of stage 02's non-profiled parameters, written once: its Spec (methods.params) and TrainConfig take
# them from here (the notebook's parameters cell repeats them for papermill; tests/test_params.py checks it agrees).
# Settings a profile chooses (steps, lr, batch, LoRA shape, checkpoints) have no default here: they are required.
RUN_DEFAULTS = {"lora": True, "ga_weight": 0.5, "mismatch_weight": 1.0, "kl_weight": 1.0, "npo_beta": 0.1,
                "max_forget_nll": 100.0, "seed": 0}


@dataclass
class TrainConfig:
    method: str
    steps: int
    lr: float
    batch_size: int
    lora_r: int
    lora_alpha: int
    lora_targets: tuple
    lora_first_layer: int
    checkpoint_every: int
    lora: bool = RUN_DEFAULTS["lora"]
    ga_weight: float = RUN_DEFAULTS["ga_weight"]
    mismatch_weight: float = RUN_DEFAULTS["mismatch_weight"]
    kl_weight: float = RUN_DEFAULTS["kl_weight"]
    npo_beta: float = RUN_DEFAULTS["npo_beta"]
    max_forget_nll: float = RUN_DEFAULTS["max_forget_nll"]
    seed: int = RUN_DEFAULTS["seed"]
    curve_points: int = 5  # adapters kept along the way for training curves (methods.run.curve_steps); 0: none

    @classmethod
    def from_params(cls, P: dict, method: str) -> "TrainConfig":
        keys = {k for k in cls.__dataclass_fields__} - {"method"}
        values = {k: P[k] for k in keys if k in P}
        values["lora_targets"] = tuple(values["lora_targets"])
        return cls(method=method, **values)

    def key(self, data: UnlearnData, model: str) -> str:
        """Identity of a run: the model preset, every setting and the data. A checkpoint resumes, and a finished
        run is reused, only under the same key (so a 13B run never picks up a 7B adapter from the same folder).
        curve_points enters when it is on, since it changes the files a run leaves (a finished run without curve
        points must not pass for one with them), and only then, so a run without curve points keeps the key it had
        before the setting existed (and its finished adapter stays reusable)."""
        config = asdict(self)
        if not config["curve_points"]:
            del config["curve_points"]
        blob = json.dumps({"model": model, "config": config, "forget": data.forget, "normal": data.normal,
                           "mismatch": data.mismatch_answers}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
