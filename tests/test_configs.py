"""Config variants and command-line overrides resolve as documented."""

import os
import subprocess
import sys

import pytest
from absl import flags

from bn_repro import train
from bn_repro.main import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mnist.py")


def test_variants_differ_only_in_bn():
    bn, baseline = load_config(f"{CONFIG}:bn"), load_config(f"{CONFIG}:baseline")
    assert bn.model.use_bn is True and baseline.model.use_bn is False
    bn_dict, baseline_dict = bn.to_dict(), baseline.to_dict()
    for d in (bn_dict, baseline_dict):
        del d["variant"], d["model"]["use_bn"]
    assert bn_dict == baseline_dict
    assert load_config(CONFIG).model.use_bn is True  # no variant: the BN net


def test_paper_values():
    config = load_config(f"{CONFIG}:bn")
    assert tuple(config.model.hidden_units) == (100, 100, 100)
    assert config.batch_size == 60 and config.num_steps == 50_000
    train.validate_config(config)


def test_overrides_of_each_type():
    config = load_config(
        f"{CONFIG}:baseline",
        [
            "--config.learning_rate=0.1",
            "--config.batch_size=32",
            "--config.bn.use_fast_variance=True",
            "--config.model.hidden_units=(50,50)",
            "--config.data.data_dir=/data/tfds",
            "--config.lr_schedule=constant",
        ],
    )
    assert config.learning_rate == 0.1 and config.batch_size == 32
    assert config.bn.use_fast_variance is True
    assert tuple(config.model.hidden_units) == (50, 50)
    assert config.data.data_dir == "/data/tfds"
    assert config.lr_schedule == "constant"
    assert config.model.use_bn is False


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.learnin_rate=0.1", "--config.learnin_rate"),
        ("--config.bn.nope=1", "--config.bn.nope"),
        ("--config.model.use_bn.deeper=1", "--config.model.use_bn.deeper"),
    ],
)
def test_unknown_field_is_named(override, field):
    with pytest.raises(flags.Error, match=field.replace(".", r"\.")):
        load_config(f"{CONFIG}:bn", [override])


@pytest.mark.parametrize(
    "override",
    ["--config.learning_rate=fast", "--config.batch_size=1.5", "--config.model.use_bn=maybe"],
)
def test_ill_typed_override_is_named(override):
    field = override.split("=")[0]
    with pytest.raises(flags.Error, match=field.replace(".", r"\.")):
        load_config(f"{CONFIG}:bn", [override])


def test_unknown_variant():
    with pytest.raises(Exception, match="Unknown variant 'large'.*'bn', 'baseline'"):
        load_config(f"{CONFIG}:large")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.checkpoint_every=750", "config.checkpoint_every .* multiple of config.eval_every"),
        ("--config.batch_size=0", "config.batch_size must be a positive integer"),
        ("--config.model.tracked_unit=100", "config.model.tracked_unit"),
        ("--config.bn.momentum=1.0", "config.bn.momentum"),
        ("--config.lr_schedule=linear", "config.lr_schedule"),
    ],
)
def test_inconsistent_values_are_rejected_naming_the_field(override, message):
    config = load_config(f"{CONFIG}:bn", [override])
    with pytest.raises(ValueError, match=message):
        train.validate_config(config)


def test_main_exits_with_the_field_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bn_repro.main", f"--config={CONFIG}:bn", f"--workdir={tmp_path}",
         "--config.bn.momentun=0.9"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "--config.bn.momentun: config.bn has no field 'momentun'" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
