"""bn-repro: a JAX/Flax reproduction of Ioffe & Szegedy, Batch Normalization (ICML 2015).

Importing the package sets one XLA:CPU option (:func:`prefer_xla_cpu_convolutions`)
before JAX starts its first backend: it must be imported before any JAX computation
runs for the option to apply.
"""

import importlib.metadata
import os
import sys
import warnings
from collections.abc import MutableMapping

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK by default; its own (Eigen)
# convolutions trained BN-Inception 1.2x faster on 2 cores (README, "Speed").
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
XLA_CPU_CONVOLUTIONS = f"--{YNN_FUSION_OPTION}=-individual_convolution"


def prefer_xla_cpu_convolutions(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> bool:
    """Appends ``XLA_CPU_CONVOLUTIONS`` to ``environ["XLA_FLAGS"]``; returns whether it did.

    Left alone where the user's XLA_FLAGS already set the YNN fusion option (theirs
    wins), and with a jaxlib other than 0.10.x, where the option was not measured
    and may not exist (XLA stops on an unknown flag). XLA reads XLA_FLAGS once, when
    JAX starts its first backend; after that the change has no effect. GPU and TPU
    backends ignore XLA:CPU options.
    """
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_OPTION in flags:
        return False
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return False
    if not jaxlib_version.startswith("0.10."):
        return False
    environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_CONVOLUTIONS}".strip()
    if environ is os.environ and _jax_backends_started():
        warnings.warn(f"bn_repro was imported after JAX started its backends, so {XLA_CPU_CONVOLUTIONS} does not "
                      "apply to this process: import bn_repro before running any JAX computation (README, 'Speed')",
                      stacklevel=2)
    return True


def _jax_backends_started() -> bool:
    if "jax" not in sys.modules:  # JAX not imported yet: nothing started
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without this private helper: no warning
        return False


prefer_xla_cpu_convolutions()
