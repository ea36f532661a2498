"""ImageNet experiments of Sec. 4.2 (Figures 2 and 3): BN-Inception and its baselines.

Variants (``--config=configs/imagenet.py:VARIANT``, optionally ``VARIANT:small``):
  inception          Figure 5's network without BN (with conv biases), dropout 0.4,
                     LRN, GoogLeNet's schedule: the paper's "Inception".
  bn_baseline        Inception + BN before each nonlinearity, nothing else changed.
  bn_x5              BN + all the Sec. 4.2.1 changes, learning rate x5.
  bn_x30             as bn_x5, learning rate x30.
  bn_x5_sigmoid      bn_x5 with sigmoid instead of ReLU.
  inception_x5       Inception with learning rate x5 (the paper: diverges).
  inception_sigmoid  Inception with sigmoid instead of ReLU (the paper: stays at chance).
  googlenet          GoogLeNet proper (arXiv:1409.4842), no BN: a reference row.

``:small`` shrinks the network (width 1/16), the input (32x32), the batch and
the number of steps, for a smoke run on CPU (e.g. on TFDS mock data). It
changes nothing else, so ``bn_x5:small`` still differs from ``inception:small``
in exactly the fields the paper lists.

Each Sec. 4.2.1 change is one field, so one flag ablates it:
  1 learning rate      lr_multiplier        (x5, x30)
  2 dropout            model.dropout_rate   (0.4 -> 0)
  3 L2                 l2_reduction         (weight_decay / 5)
  4 decay speed-up     lr_decay_speedup     (x6)
  5 LRN                model.use_lrn        (True -> False)
  6 shuffling          data.shuffle         ('window' -> 'global')
  7 distortions        data.distortion_strength (1.0 -> 0.5)

[paper] = stated in the paper (Sec. 4.2, Figure 3, Figure 5); [googlenet] =
GoogLeNet's published setting (arXiv:1409.4842 or its BVLC Caffe solver),
which the paper says its baseline follows; [ours] = our choice where neither
says.
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = (
    "inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid", "inception_x5", "inception_sigmoid",
    "googlenet",
)
SMALL = "small"
FASHION = "fashion"
FASHION_LEARNING_RATE = 0.015  # the pilot sweep's best (README; results/fashion/pilot_lr.md)
FASHION_STEPS = 20_000


def get_config(arg: str = "bn_x30") -> ml_collections.ConfigDict:
    variant, _, size = arg.partition(":")
    if variant not in VARIANTS or size not in ("", SMALL, FASHION):
        raise ValueError(
            f"Unknown variant {arg!r} for configs/imagenet.py; choose one of {VARIANTS}, optionally "
            "followed by ':small', e.g. --config=configs/imagenet.py:bn_x30 or configs/imagenet.py:bn_x5:small"
        )
    use_bn = variant.startswith("bn_")
    accelerated = variant in ("bn_x5", "bn_x30", "bn_x5_sigmoid")  # all of Sec. 4.2.1

    config = ml_collections.ConfigDict()
    # An image classification experiment over a TFDS dataset (data.dataset).
    config.experiment = "classification"
    config.variant = arg
    config.seed = 0  # [ours] initialisation, data order, augmentation.

    config.model = ml_collections.ConfigDict()
    # 'bn_inception' (Figure 5) or 'googlenet' (the 2014 network).
    config.model.architecture = "googlenet" if variant == "googlenet" else "bn_inception"
    config.model.num_classes = 1000  # [paper]
    config.model.use_bn = use_bn  # [paper]
    config.model.nonlinearity = "sigmoid" if variant.endswith("sigmoid") else "relu"  # [paper]
    config.model.dropout_rate = 0.0 if accelerated else 0.4  # [paper] 4.2.1 item 2; 40% [googlenet].
    config.model.use_lrn = not accelerated  # [paper] 4.2.1 item 5; at GoogLeNet's stem positions.
    # [paper] footnote: the first conv is separable with depth multiplier 8.
    config.model.separable_stem = config.model.architecture == "bn_inception"
    # [ours] 4c/4d pool projection: 96 as TF-slim (outputs 576, as Figure 5's
    # output column) rather than the printed 128 (608 channels); see README.
    config.model.pool_proj_4cd = 96
    config.model.width = 1.0  # [paper] channel multiplier; 1 = Figure 5.
    config.model.aux_heads = False  # GoogLeNet only; [ours] off, the BN paper does not use them.
    # 'float32' or 'bfloat16' computation; parameters and BN statistics stay float32.
    config.model.dtype = "float32"

    config.bn = ml_collections.ConfigDict()
    # [ours] moving-average decay and epsilon of TF-slim's inception_v2 (batch 32).
    config.bn.momentum = 0.9997
    config.bn.epsilon = 1e-3
    config.bn.use_fast_variance = False  # [ours] two-pass variance, as Algorithm 1.
    # [ours] Algorithm 2: training mini-batches (of batch_size) averaged into
    # the final model's population statistics: 1000 x 32 = 32k images.
    config.bn.population_batches = 1000
    # Data parallelism: 'global' (statistics of the whole global batch),
    # 'per_device' (each device's share), or 'virtual' (groups of
    # virtual_batch_size examples whatever the device count: [paper] the
    # per-worker mini-batch of 32 of its asynchronous training).
    config.bn.statistics = "global"
    config.bn.virtual_batch_size = 32

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "imagenet2012"
    # TFDS data dir (holding imagenet2012 prepared as array_record, or the two
    # ILSVRC2012 tars in <data_dir>/downloads/manual); None -> $TFDS_DATA_DIR
    # or ~/tensorflow_datasets.
    config.data.data_dir = config_dict.placeholder(str)
    config.data.image_size = 224  # [paper] 224x224 crops.
    # Input channels: 3 (a grey image repeated) or 1 (a colour image made grey).
    config.data.channels = 3  # [paper] colour images.
    # [ours] evaluation: shorter side resized to image_size / crop_fraction
    # (256 for 224), then the central crop (the paper's single crop).
    config.data.crop_fraction = 0.875
    # [paper] 4.2.1 item 7 "reduce the photometric distortions": [ours] by half.
    config.data.distortion_strength = 0.5 if accelerated else 1.0
    # [paper] 4.2.1 item 6: 'global' (a fresh permutation every epoch) vs the
    # baseline's [ours] 'window': the stored order cut into windows ("shards")
    # of shuffle_window examples, each in one fixed order that every epoch
    # repeats, and only the windows' order shuffled; every mini-batch then
    # holds the same examples in every epoch.
    config.data.shuffle = "global" if accelerated else "window"
    config.data.shuffle_window = 10_240  # [ours] 320 mini-batches of 32; a multiple of batch_size.
    config.data.eval_split = "validation"  # [paper] the 50k validation images.
    # [ours] Keep the evaluation split's preprocessed central crops in host memory after the
    # first evaluation (they are the same every time): for a small split only.
    config.data.cache_eval_batches = False
    config.data.num_workers = 8  # [ours] decoding/augmentation processes per host.

    config.batch_size = 32  # [paper] per step: the global batch, split over the devices.
    # 'jit' (the batch sharded over every device) or 'pmap' (one copy per device).
    config.parallel = "jit"
    # If > 0, the global batch is this many examples per device times the
    # device count (batch_size is then set from it); 0: batch_size as given.
    config.per_device_batch_size = 0
    # 'none', or 'linear': the learning rate times batch_size / lr_reference_batch_size
    # (for a global batch grown with the device count).
    config.lr_scaling = "none"
    config.lr_reference_batch_size = 32  # the paper's batch
    config.eval_batch_size = 250  # [ours] 50,000 = 200 x 250; the last batch is padded if needed.
    config.learning_rate = 0.0015  # [paper] Inception's initial learning rate.
    config.lr_multiplier = {"bn_x5": 5.0, "bn_x5_sigmoid": 5.0, "inception_x5": 5.0, "bn_x30": 30.0}.get(
        variant, 1.0
    )  # [paper] 4.2.1 item 1.
    config.momentum = 0.9  # [googlenet]
    # [googlenet] L2 factor of the BVLC solver (0.0002), divided by
    # l2_reduction ([paper] 4.2.1 item 3: 5x less).
    config.weight_decay = 2e-4
    config.l2_reduction = 5.0 if accelerated else 1.0
    # [googlenet] exponential staircase decay: x0.96 every 8 epochs, made
    # lr_decay_speedup times faster ([paper] 4.2.1 item 4: 6x, i.e. x0.96
    # every 1.33 epochs, about Inception-v3's x0.94 every 2 epochs).
    config.lr_schedule = "exponential"
    config.lr_decay_rate = 0.96
    config.lr_decay_epochs = 8.0
    config.lr_decay_speedup = 6.0 if accelerated else 1.0
    # [paper] Figure 3: Inception reaches its 72.2% after 31.0e6 steps; BN-x30
    # its 74.8% after 6e6 steps (Figure 2 runs to 30e6).
    config.num_steps = 6_000_000 if accelerated else 31_000_000
    config.eval_every = 100_000  # [ours] a full 50k validation pass.
    config.eval_at = ()  # [ours] extra evaluation steps (none).
    # [ours] A progress line (train loss, steps/s, images/s, time left) every log_every steps between
    # evaluations; a non-finite loss stops the run within log_every steps.
    config.log_every = 1_000
    config.checkpoint_every = 100_000  # [ours]
    # [paper] Figure 3: the steps at which the paper's nets matched Inception's
    # 72.2%, and the five nets' maximum top-1 accuracies; summary.json reports
    # top-1 at those steps and the steps to reach those accuracies.
    config.milestones = (2_100_000, 2_700_000, 6_000_000, 13_300_000, 31_000_000)
    config.targets = (0.698, 0.722, 0.727, 0.730, 0.748)
    # [paper] compare_runs' default target: "steps to match Inception" (72.2%).
    config.target_accuracy = 0.722

    if size == FASHION:
        fashion_proxy(config)
    if size == SMALL:
        config.model.width = 1 / 16
        config.data.image_size = 32
        config.data.shuffle_window = 8
        config.data.num_workers = 0
        config.batch_size = 8
        config.bn.virtual_batch_size = 8
        config.eval_batch_size = 8
        config.bn.population_batches = 2
        config.num_steps = 4
        config.eval_every = 2
        config.checkpoint_every = 4
    return config


def fashion_proxy(config: ml_collections.ConfigDict) -> None:
    """``:fashion``: the same experiment on Fashion-MNIST at a size 2 CPU cores run.

    Only dataset, size, step-budget and base-learning-rate fields change
    (tests/test_configs.py checks it), so the proxy variants differ from each
    other exactly as the ImageNet ones do. README justifies each value.
    """
    # Dataset: Fashion-MNIST's 60k training and 10k test 28x28 grey images, 10 classes.
    config.data.dataset = "fashion_mnist"
    config.data.eval_split = "test"
    config.data.channels = 1
    config.model.num_classes = 10
    # [ours] 480 = 15 mini-batches: 125 windows per epoch, as 10,240 gives on ImageNet's 1.28M images.
    config.data.shuffle_window = 480
    config.data.num_workers = 0  # in-process loading: one run per core (results do not depend on it)
    # Size: width 1/16 at 64x64, so that 3a/4a/5a see 8x8/4x4/2x2 maps.
    config.model.width = 1 / 16
    config.data.image_size = 64
    # Base learning rate: the rate `inception` trained best with in the pilot sweep (README).
    config.learning_rate = FASHION_LEARNING_RATE
    # Step budget: every variant the same number of steps.
    config.num_steps = FASHION_STEPS
    # Evaluations 5% of the run apart, and from step 100 on never more than 5% of the step apart,
    # so that steps-to-target is placed within 5% however early a variant reaches it.
    config.eval_every = FASHION_STEPS // 20
    config.eval_at = geometric_steps(100, FASHION_STEPS, 1.05)
    config.data.cache_eval_batches = True  # the 10k test crops: 164 MB
    config.checkpoint_every = FASHION_STEPS // 10
    # The moving averages' decay scaled to the budget: a time constant of 100 steps (3,200 images),
    # where 0.9997's 3,333 steps would leave them at their initial values for a large part of the run.
    config.bn.momentum = 0.99
    # Figure 3's milestones and targets are ImageNet's; scripts/reproduce_figure2.py reads the
    # proxy's from its `inception` runs.
    config.milestones = ()
    config.targets = ()
    config.target_accuracy = config_dict.placeholder(float)


def geometric_steps(first: int, last: int, ratio: float) -> tuple[int, ...]:
    """``first``, then each step ``ratio`` times the previous (rounded down, at least one more), below ``last``."""
    steps = [first]
    while (step := max(steps[-1] + 1, int(steps[-1] * ratio))) < last:
        steps.append(step)
    return tuple(steps)
