"""Hydra-style overrides on nested dataclasses, frozen ones included."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from nemo_paced.overrides import OverrideError, apply_overrides, parse_value
from nemo_paced.weighting import WeightConfig, WeightMode


@dataclass
class Train:
    lr: float = 1e-5
    iters: int = 100
    name: str = "run"
    band: tuple = (0.2, 0.8)
    out: Path = Path("runs/a")
    dtype: torch.dtype = torch.float32
    resume: bool = False
    ckpt: str | None = None


@dataclass
class Model:
    tensor_model_parallel_size: int = 1
    teacher: "Model | None" = None

    def __setattr__(self, name, value):  # mirrors settings to the teacher, like Bridge's DistillationProvider
        super().__setattr__(name, value)
        if name != "teacher" and getattr(self, "teacher", None) is not None:
            setattr(self.teacher, name, value)


@dataclass
class Container:
    train: Train = field(default_factory=Train)
    model: Model = field(default_factory=lambda: Model(teacher=Model()))
    weighting: WeightConfig = field(default_factory=WeightConfig)
    extra: dict = field(default_factory=lambda: {"k": 1})


def test_values_take_the_type_of_the_setting_they_replace():
    c = apply_overrides(Container(), ["train.lr=3", "train.iters=7", "train.name=2024", "train.band=[0.1,0.9]",
                                      "train.out=/tmp/x", "train.dtype=bfloat16", "train.resume=true",
                                      "train.ckpt=null", "extra.k=2"])
    assert c.train.lr == 3.0 and isinstance(c.train.lr, float)
    assert c.train.iters == 7 and c.train.name == "2024" and c.train.band == (0.1, 0.9)
    assert c.train.out == Path("/tmp/x") and c.train.dtype is torch.bfloat16 and c.train.resume is True
    assert c.train.ckpt is None and c.extra == {"k": 2}
    assert apply_overrides(Container(), ["train.ckpt=/ckpt/step-10"]).train.ckpt == "/ckpt/step-10"


def test_frozen_dataclass_is_rebuilt_and_enums_parse():
    c = Container()
    before = c.weighting
    c = apply_overrides(c, ["weighting.mode=sample", "weighting.alpha=2"])
    assert c.weighting.mode is WeightMode.SAMPLE and c.weighting.alpha == 2.0
    assert before.mode is WeightMode.LOSS  # the original frozen config is untouched


def test_setattr_mirroring_is_kept():
    c = apply_overrides(Container(), ["model.tensor_model_parallel_size=4"])
    assert c.model.teacher.tensor_model_parallel_size == 4


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "no setting 'train.lrr'; did you mean train.lr"),
    ("train.iters=1.5", "'1.5' is not a valid int"),
    ("train.resume=yes", "'yes' is not a valid bool"),
    ("weighting.mode=soft", "'soft' is not one of loss, sample, filter, uniform"),
    ("train.dtype=float99", "not a torch dtype"),
    ("train=3", "group of settings"),
    ("train.lr", "not of the form"),
    ("train..lr=1", "not of the form"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(OverrideError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(Container(), [override])


def test_parse_value():
    assert parse_value("1e-4") == 1e-4 and parse_value("[1, 2]") == [1, 2] and parse_value("'x'") == "x"
    assert parse_value("a/b") == "a/b" and parse_value("None") is None and parse_value("False") is False
