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


def test_main_names_a_missing_config_file_and_a_workdir_that_is_a_file(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "bn_repro.main", "--config=configs/nope.py:bn", f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert missing.returncode == 2
    assert f"--config=configs/nope.py:bn: no config file '{os.path.join(REPO, 'configs', 'nope.py')}'" in missing.stderr
    (tmp_path / "file").write_text("keep me")
    a_file = subprocess.run(
        [sys.executable, "-m", "bn_repro.main", f"--config={CONFIG}:bn", f"--workdir={tmp_path / 'file'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert a_file.returncode != 0 and "Traceback" not in a_file.stderr
    assert f"--workdir {tmp_path / 'file'} is a file, not a directory" in a_file.stderr
    assert (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "w").exists()


# ImageNet (Sec. 4.2): each variant differs from its reference in exactly the
# fields the paper names.

IMAGENET = os.path.join(REPO, "configs", "imagenet.py")
SEC_421_FIELDS = {  # Sec. 4.2.1 items 2-7 (item 1, the learning rate, is per variant)
    "model.dropout_rate", "l2_reduction", "lr_decay_speedup", "model.use_lrn", "data.shuffle",
    "data.distortion_strength",
}


def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(a: str, b: str) -> set[str]:
    x, y = flat(load_config(f"{IMAGENET}:{a}").to_dict()), flat(load_config(f"{IMAGENET}:{b}").to_dict())
    return {k for k in x if x[k] != y[k]} - {"variant"}


@pytest.mark.parametrize(
    "variant, reference, fields",
    [
        ("bn_baseline", "inception", {"model.use_bn"}),
        ("bn_x5", "bn_baseline", SEC_421_FIELDS | {"lr_multiplier", "num_steps"}),
        ("bn_x30", "bn_x5", {"lr_multiplier"}),
        ("bn_x5_sigmoid", "bn_x5", {"model.nonlinearity"}),
        ("inception_x5", "inception", {"lr_multiplier"}),
        ("inception_sigmoid", "inception", {"model.nonlinearity"}),
        ("googlenet", "inception", {"model.architecture", "model.separable_stem"}),
        ("bn_x5:small", "bn_x5", {"model.width", "data.image_size", "data.shuffle_window", "data.num_workers",
                                  "batch_size", "eval_batch_size", "bn.population_batches", "bn.virtual_batch_size", "num_steps",
                                  "eval_every", "checkpoint_every"}),
    ],
)
def test_imagenet_variants_differ_only_in_the_papers_changes(variant, reference, fields):
    assert changed_fields(variant, reference) == fields


def test_imagenet_paper_values():
    x5, x30, inception = (load_config(f"{IMAGENET}:{v}") for v in ("bn_x5", "bn_x30", "inception"))
    assert train.initial_learning_rate(inception) == pytest.approx(0.0015)  # Figure 3
    assert train.initial_learning_rate(x5) == pytest.approx(0.0075)
    assert train.initial_learning_rate(x30) == pytest.approx(0.045)
    assert inception.batch_size == 32 and inception.model.dropout_rate == 0.4 and inception.model.use_lrn
    assert x5.model.dropout_rate == 0.0 and not x5.model.use_lrn and x5.data.shuffle == "global"
    assert x5.weight_decay / x5.l2_reduction == pytest.approx(inception.weight_decay / 5)
    assert load_config(IMAGENET).variant == "bn_x30"
    for variant in ("inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid", "inception_x5",
                    "inception_sigmoid", "googlenet"):
        train.validate_config(load_config(f"{IMAGENET}:{variant}"))


def test_imagenet_unknown_variant_or_size():
    for arg in ("bn_x10", "bn_x5:tiny"):
        with pytest.raises(Exception, match="Unknown variant.*imagenet.py:bn_x5:small"):
            load_config(f"{IMAGENET}:{arg}")


def test_staircase_decay_is_6x_faster_in_the_accelerated_variants():
    """x0.96 every 8 epochs (GoogLeNet), every 8/6 epochs with Sec. 4.2.1 item 4."""
    steps_per_epoch = 600
    inception = train.create_learning_rate_schedule(load_config(f"{IMAGENET}:inception"), steps_per_epoch)
    x5 = train.create_learning_rate_schedule(load_config(f"{IMAGENET}:bn_x5"), steps_per_epoch)
    assert inception(8 * 600 - 1) == pytest.approx(0.0015)
    assert inception(8 * 600) == pytest.approx(0.0015 * 0.96)
    assert inception(16 * 600) == pytest.approx(0.0015 * 0.96**2)
    assert x5(799) == pytest.approx(0.0075) and x5(800) == pytest.approx(0.0075 * 0.96)
    assert x5(6 * 800) == pytest.approx(0.0075 * 0.96**6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.shuffle=sometimes", "config.data.shuffle must be one of"),
        ("--config.model.dtype=float16", "config.model.dtype must be one of"),
        ("--config.model.nonlinearity=tanh", "config.model.nonlinearity must be one of"),
        ("--config.model.dropout_rate=1.0", "config.model.dropout_rate"),
        ("--config.eval_batch_size=0", "config.eval_batch_size must be a positive integer"),
        ("--config.lr_decay_speedup=0.0", "config.lr_decay_speedup must be > 0"),
        ("--config.data.shuffle=window --config.data.shuffle_window=10000",
         r"config.data.shuffle_window \(10000\) must be a multiple of the global batch \(config.batch_size = 32\)"),
    ],
)
def test_imagenet_inconsistent_values_are_rejected_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        train.validate_config(load_config(f"{IMAGENET}:bn_x5", override.split()))


def test_weight_decay_skips_biases_and_bn_and_follows_l2_reduction():
    """The L2 term adds weight_decay / l2_reduction * w to kernels' gradients only."""
    import jax.numpy as jnp

    config = load_config(f"{IMAGENET}:bn_x5", ["--config.momentum=0.0", "--config.lr_schedule=constant"])
    tx = train.create_optimizer(config, steps_per_epoch=1)
    params = {"conv": {"kernel": jnp.ones(3)}, "bn": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}
    zeros = {"conv": {"kernel": jnp.zeros(3)}, "bn": {"scale": jnp.zeros(3), "bias": jnp.zeros(3)}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    lr, decay = 0.0075, 2e-4 / 5
    assert jnp.allclose(updates["conv"]["kernel"], -lr * decay)
    assert jnp.all(updates["bn"]["scale"] == 0) and jnp.all(updates["bn"]["bias"] == 0)


def test_linear_learning_rate_scaling_with_the_global_batch():
    base = load_config(f"{IMAGENET}:bn_x30")
    scaled = load_config(f"{IMAGENET}:bn_x30", ["--config.lr_scaling=linear", "--config.batch_size=256"])
    assert train.initial_learning_rate(scaled) == pytest.approx(train.initial_learning_rate(base) * 256 / 32)
    unscaled = load_config(f"{IMAGENET}:bn_x30", ["--config.batch_size=256"])
    assert train.initial_learning_rate(unscaled) == pytest.approx(0.045)
    with pytest.raises(ValueError, match="config.lr_scaling"):
        train.validate_config(load_config(f"{IMAGENET}:bn_x30", ["--config.lr_scaling=sqrt"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.parallel=pjit"], "config.parallel must be one of"),
        (["--config.bn.statistics=local"], "config.bn.statistics must be one of"),
        (["--config.bn.statistics=virtual", "--config.bn.virtual_batch_size=7"], "config.bn.virtual_batch_size .* divisor"),
    ],
)
def test_parallel_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate_config(load_config(f"{IMAGENET}:bn_x30", overrides))


def test_per_device_batch_size_sets_the_global_batch():
    from bn_repro import parallel

    config = load_config(f"{IMAGENET}:bn_x30", ["--config.per_device_batch_size=32"])
    assert parallel.with_global_batch(config, 8).batch_size == 256
    assert parallel.with_global_batch(config, 1).batch_size == 32
    plain = load_config(f"{IMAGENET}:bn_x30")
    assert parallel.with_global_batch(plain, 8).batch_size == 32  # batch_size is the global batch


# The Fashion-MNIST proxy (`:fashion`): only dataset, size, step-budget and
# base-learning-rate fields change, and the proxies differ from each other as
# the ImageNet variants do.

FASHION_FIELDS = {
    # dataset
    "data.dataset", "data.eval_split", "data.channels", "model.num_classes", "data.shuffle_window",
    "data.num_workers", "data.cache_eval_batches",
    # size
    "model.width", "data.image_size",
    # step budget (bn.momentum: the moving averages' time constant, in steps)
    "num_steps", "eval_every", "eval_at", "checkpoint_every", "bn.momentum", "milestones", "targets",
    "target_accuracy",
    # base learning rate
    "learning_rate",
}
PROXY_VARIANTS = ("inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid", "inception_x5",
                  "inception_sigmoid", "googlenet")


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_fashion_proxy_differs_from_its_imagenet_twin_only_in_dataset_size_budget_and_base_lr(variant):
    changed = changed_fields(f"{variant}:fashion", variant)
    assert changed <= FASHION_FIELDS
    assert {"data.dataset", "model.width", "num_steps", "learning_rate"} <= changed
    train.validate_config(load_config(f"{IMAGENET}:{variant}:fashion"))


def test_fashion_proxies_differ_from_each_other_as_the_imagenet_variants_do():
    configs = {v: flat(load_config(f"{IMAGENET}:{v}").to_dict()) for v in PROXY_VARIANTS}
    proxies = {v: flat(load_config(f"{IMAGENET}:{v}:fashion").to_dict()) for v in PROXY_VARIANTS}
    for a in PROXY_VARIANTS:
        for b in PROXY_VARIANTS:
            ours = {k: (proxies[a][k], proxies[b][k]) for k in proxies[a] if proxies[a][k] != proxies[b][k]}
            theirs = {k: (configs[a][k], configs[b][k]) for k in configs[a] if configs[a][k] != configs[b][k]}
            ours.pop("variant", None), theirs.pop("variant", None)
            # Every proxy gets the same step budget (ImageNet's accelerated variants run 6M of 31M steps).
            theirs.pop("num_steps", None)
            assert ours == theirs, (a, b)


def test_fashion_proxy_evaluates_within_5_percent_of_any_step_from_100():
    config = load_config(f"{IMAGENET}:bn_x5:fashion")
    steps = train.evaluation_steps(config)
    assert steps[0] == 100 and steps[-1] == config.num_steps
    assert all(later <= earlier * 1.05 + 1 for earlier, later in zip(steps, steps[1:]))
    assert set(range(config.eval_every, config.num_steps + 1, config.eval_every)) <= set(steps)
    assert config.checkpoint_every % config.eval_every == 0


def test_evaluation_steps_add_eval_at_to_every_eval_every():
    config = load_config(f"{IMAGENET}:bn_x5:small", ["--config.num_steps=10", "--config.eval_every=4",
                                                   "--config.checkpoint_every=8", "--config.eval_at=(1,3,9,12)"])
    assert train.evaluation_steps(config) == [1, 3, 4, 8, 9, 10]
    bad = load_config(f"{IMAGENET}:bn_x5:small", ["--config.eval_at=(0,)"])
    with pytest.raises(ValueError, match="config.eval_at"):
        train.validate_config(bad)
