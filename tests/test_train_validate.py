from __future__ import annotations

import math

import pytest
from medfedpure.train.classifier import ClassifierTrainConfig
from medfedpure.train.distill import DistillConfig
from medfedpure.train.mae import MAETrainConfig
from medfedpure.train.purifier import DenoiserTrainConfig

CONFIGS = [ClassifierTrainConfig, MAETrainConfig, DenoiserTrainConfig, DistillConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_shared_range_checks_name_the_field(cls) -> None:
    with pytest.raises(ValueError, match=r"^epochs=0: must be >= 1$"):
        cls(epochs=0)
    with pytest.raises(ValueError, match=r"^batch_size=-3: must be >= 1$"):
        cls(batch_size=-3)
    with pytest.raises(ValueError, match=r"^lr=0.0: must be > 0$"):
        cls(lr=0.0)
    with pytest.raises(ValueError, match=r"^lr=nan: must be > 0$"):
        cls(lr=math.nan)


@pytest.mark.parametrize(("cls", "field"), [(ClassifierTrainConfig, "weight_decay"), (MAETrainConfig, "shift_px"),
                                            (DenoiserTrainConfig, "warmup_steps"), (DistillConfig, "warmup_steps")])
def test_non_negative_fields(cls, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}=-1: must be >= 0$"):
        cls(**{field: -1})


def test_list_fields_become_tuples() -> None:
    assert DenoiserTrainConfig(val_times=[10.0, 20.0]).val_times == (10.0, 20.0)
    cfg = DistillConfig(student_steps=[1, 2], val_times=[30.0])
    assert cfg.student_steps == (1, 2) and cfg.val_times == (30.0,)
    hash(cfg)  # frozen and hashable after the conversion
