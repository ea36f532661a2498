"""The XLA:CPU option that ``import bn_repro`` sets (bn_repro/__init__.py): added once, left to the user where
they set it, and in effect: BN-Inception's convolutions compiled by XLA itself, not handed to YNNPACK."""

import importlib.metadata
import subprocess
import sys

import pytest

import bn_repro
from conftest import REPO, subprocess_env

OPTION = "--xla_cpu_experimental_ynn_fusion_type"


def test_the_option_is_appended_to_the_users_flags_once():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert bn_repro.prefer_xla_cpu_convolutions(environ, jaxlib_version="0.10.2")
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OPTION}=-individual_convolution"
    assert not bn_repro.prefer_xla_cpu_convolutions(environ, jaxlib_version="0.10.2")
    assert environ["XLA_FLAGS"].count(OPTION) == 1
    environ = {}
    assert bn_repro.prefer_xla_cpu_convolutions(environ, jaxlib_version="0.10.0")
    assert environ == {"XLA_FLAGS": f"{OPTION}=-individual_convolution"}


@pytest.mark.parametrize("environ, version", [
    ({"XLA_FLAGS": f"{OPTION}=+individual_convolution"}, "0.10.2"),  # the user's own choice wins
    ({"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"}, "0.9.1"),  # not measured there; may not exist
    ({}, "0.11.0"),
])
def test_the_option_is_left_alone(environ, version):
    before = dict(environ)
    assert not bn_repro.prefer_xla_cpu_convolutions(environ, jaxlib_version=version)
    assert environ == before


CONVOLUTION_GRADIENT = """
import bn_repro, jax, jax.numpy as jnp
def loss(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y))
text = jax.jit(jax.grad(loss, (0, 1))).lower(jnp.ones((8, 32, 32, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text()
print(text.count("convolution("), text.count("__ynn_fusion"))
"""


def fresh_process_env(*user_flags: str) -> dict[str, str]:
    """The tests' subprocess environment without the option this process's ``import bn_repro`` added, and without
    the persistent compilation cache (a program read back from it prints otherwise than a fresh compile)."""
    env = {k: v for k, v in subprocess_env(*user_flags).items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(bn_repro.XLA_CPU_CONVOLUTIONS, "")
    return env


@pytest.mark.skipif(not importlib.metadata.version("jaxlib").startswith("0.10."), reason="measured on jaxlib 0.10")
@pytest.mark.parametrize("user_flags, ynn", [((), False), ((f"{OPTION}=+individual_convolution",), True)])
def test_convolutions_are_compiled_by_xla_unless_the_user_says_otherwise(user_flags, ynn):
    """In a fresh process (XLA reads its flags once): the forward convolution and both gradients are XLA's own
    after ``import bn_repro``, and YNNPACK fusions where the user asked for YNNPACK's convolutions."""
    env = fresh_process_env(*user_flags)
    assert OPTION not in env["XLA_FLAGS"] or user_flags
    out = subprocess.run([sys.executable, "-c", CONVOLUTION_GRADIENT], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    convolutions, ynn_fusions = map(int, out)
    assert convolutions == 3
    assert (ynn_fusions > 0) == ynn


MNIST_STEP = """
import hashlib, os, sys
import bn_repro, jax, jax.numpy as jnp
from bn_repro import train
from bn_repro.main import load_config
config = load_config(os.path.join("configs", "mnist.py") + ":bn", [])
state = train.create_train_state(jax.random.PRNGKey(0), config, train.create_setup(config).model, (784,), 1000)
batch = {"image": jnp.zeros((config.batch_size, 784)), "label": jnp.zeros((config.batch_size,), jnp.int32)}
print(hashlib.sha256(jax.jit(train.train_step).lower(state, batch).compile().as_text().encode()).hexdigest())
"""


@pytest.mark.skipif(not importlib.metadata.version("jaxlib").startswith("0.10."), reason="measured on jaxlib 0.10")
def test_the_option_leaves_the_mnist_mlps_compiled_step_unchanged():
    """The MLP has no convolutions: its compiled training step is the same program with YNNPACK's convolutions
    (the user's choice) and without (the package's), so its benchmark (results/bench/mnist_cpu.md) stands."""
    texts = []
    for user_flags in ((), (f"{OPTION}=+individual_convolution",)):
        texts.append(subprocess.run([sys.executable, "-c", MNIST_STEP], cwd=REPO, env=fresh_process_env(*user_flags),
                                    capture_output=True, text=True, check=True).stdout.strip())
    assert len(texts[0]) == 64 and texts[0] == texts[1]


@pytest.mark.skipif(not importlib.metadata.version("jaxlib").startswith("0.10."), reason="measured on jaxlib 0.10")
@pytest.mark.parametrize("first, warned", [("import jax; jax.devices()", True), ("import jax", False)])
def test_importing_bn_repro_after_jax_started_warns(first, warned):
    """Once a backend has started, XLA has read its flags: the option cannot apply, and the import says so."""
    code = f"{first}\nimport warnings\nwarnings.simplefilter('always')\nimport bn_repro"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fresh_process_env(), capture_output=True,
                            text=True, check=True)
    assert ("imported after JAX started its backends" in result.stderr) == warned, result.stderr
