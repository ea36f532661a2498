"""The MNIST network of Sec. 4.1: 784-100-100-100-10, sigmoid hidden units.

Without BN each hidden layer computes sigmoid(W u + b); with BN it computes
sigmoid(BN(W u)) with no bias, BN's beta taking its place (Sec. 3.2). The
output layer is linear (softmax is in the loss). All weights start as small
random Gaussians; the standard deviation is not given by the paper.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from bn_repro.batchnorm import BatchNorm, Norm

# Name under which the model sows the input of the last hidden layer's
# sigmoids into the 'intermediates' collection (Figure 1(b, c)).
SIGMOID_INPUT = "last_sigmoid_input"


class MLP(nn.Module):
    """Fully connected sigmoid network, optionally with BN before each sigmoid.

    Attributes:
      hidden_units: width of each hidden layer.
      num_classes: outputs of the final linear layer.
      weight_init_std: standard deviation of the Gaussian weight init.
      norm: the BN layer (a ``BatchNorm`` or a ``functools.partial`` of it
        with the run's settings): sigmoid(norm(W u)); None: sigmoid(W u + b).
    """

    hidden_units: Sequence[int] = (100, 100, 100)
    num_classes: int = 10
    weight_init_std: float = 0.01
    norm: Norm | None = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        init = nn.initializers.normal(self.weight_init_std)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden_units):
            z = nn.Dense(width, use_bias=self.norm is None, kernel_init=init, name=f"hidden{i}")(x)
            if self.norm is not None:
                z = self.norm(name=f"bn{i}")(z, use_running_average=not train)
            x = nn.sigmoid(z)
        self.sow("intermediates", SIGMOID_INPUT, z)
        return nn.Dense(self.num_classes, kernel_init=init, name="output")(x)
