"""The MNIST network of Sec. 4.1: 784-100-100-100-10, sigmoid hidden units.

Without BN each hidden layer computes sigmoid(W u + b); with BN it computes
sigmoid(BN(W u)) with no bias, BN's beta taking its place (Sec. 3.2). The
output layer is linear (softmax is in the loss). All weights start as small
random Gaussians; the standard deviation is not given by the paper.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from bn_repro.batchnorm import BatchNorm

# Name under which the model sows the input of the last hidden layer's
# sigmoids into the 'intermediates' collection (Figure 1(b, c)).
SIGMOID_INPUT = "last_sigmoid_input"


class MLP(nn.Module):
    """Fully connected sigmoid network, optionally with BN before each sigmoid.

    Attributes:
      hidden_units: width of each hidden layer.
      num_classes: outputs of the final linear layer.
      use_bn: sigmoid(BN(W u)) instead of sigmoid(W u + b).
      weight_init_std: standard deviation of the Gaussian weight init.
      bn_momentum, bn_epsilon, bn_use_fast_variance, bn_axis_name,
        bn_virtual_batch_size: see BatchNorm.
    """

    hidden_units: Sequence[int] = (100, 100, 100)
    num_classes: int = 10
    use_bn: bool = True
    weight_init_std: float = 0.01
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-5
    bn_use_fast_variance: bool = False
    bn_axis_name: str | None = None
    bn_virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        init = nn.initializers.normal(self.weight_init_std)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden_units):
            z = nn.Dense(width, use_bias=not self.use_bn, kernel_init=init, name=f"hidden{i}")(x)
            if self.use_bn:
                z = BatchNorm(
                    momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon,
                    use_fast_variance=self.bn_use_fast_variance,
                    axis_name=self.bn_axis_name,
                    virtual_batch_size=self.bn_virtual_batch_size,
                    name=f"bn{i}",
                )(z, use_running_average=not train)
            x = nn.sigmoid(z)
        self.sow("intermediates", SIGMOID_INPUT, z)
        return nn.Dense(self.num_classes, kernel_init=init, name="output")(x)
