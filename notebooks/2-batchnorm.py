# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Batch normalization
#
# Part: `batchnorm2d_backward` in `minires/functional/batchnorm.py`. The
# derivation: `docs/backward/batchnorm.md` (in this copy when it was made with
# `--with-docs`, otherwise in the course repository). Notebook 1's parts come first.
#
# Per channel $c$, over the $M = N H W$ values of the batch and the image:
#
# $$\mu = \frac{1}{M} \sum x, \qquad \sigma^2 = \frac{1}{M} \sum (x - \mu)^2, \qquad
# \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat{x} + \beta .$$
#
# * $\partial L/\partial \beta$ and $\partial L/\partial \gamma$ are sums over the
#   batch and the image (axes 0, 2, 3), one number per channel.
# * **Eval mode**: $\mu$ and $\sigma^2$ are the running statistics, constants. Then
#   $y$ is an affine function of $x$, and $dx$ is `dout` times one factor per channel.
# * **Training mode**: $\mu$ and $\sigma^2$ are computed from $x$ itself, so every
#   $x_i$ moves every $\hat{x}_j$ of its channel. Follow the three paths from $x$ to
#   $\hat{x}$ (directly, through $\mu$, through $\sigma^2$) and add them; the result
#   fits in one line per channel, in terms of $\hat{x}$, `inv_std` and two channel sums.
#
# Test your training-mode formula on paper first: with `dout` the same constant
# everywhere, what must $dx$ be?

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np

from minires import assignment
from minires.functional import activation, batchnorm, linear, loss

assignment.notebook_setup()

# %%
assignment.check_parts("batchnorm2d_backward")

# %% [markdown]
# ## Questions
#
# **Q1.** In training mode, show that $\sum_i dx_i = 0$ over each channel, for any
# `dout`. What does that say about the gradient of a constant added to the layer's
# input, and why does it make sense?
#
# *Your answer:*
#
#
# **Q2.** Scale the input: $x \to a x$ with $a > 0$. What happens to the forward's
# output and to $dx$ (training mode)? What does that imply for the weights of a
# layer that feeds a BatchNorm layer?
#
# *Your answer:*
#

# %% [markdown]
# ## Experiment: the gradient through 20 layers, with and without BatchNorm
#
# A 20-layer fully connected ReLU network (width 64) at initialization, its
# weights drawn with variance $1/D$ (not the $2/D$ that suits ReLU). One
# backward pass of the softmax loss on a random batch of 32; the table shows the
# norm of the gradient reaching each layer's input, $\lVert \partial L / \partial
# h_\ell \rVert$, from the input (layer 1) to the output, without and with a
# BatchNorm after every Linear layer. Every backward here is yours (BatchNorm runs
# on `(N, C, 1, 1)` arrays: one "pixel" per feature).

# %%
rng = np.random.default_rng(0)
N, D, depth = 32, 64, 20
x0 = rng.standard_normal((N, D))
y = rng.integers(0, 10, N)
weights = [rng.standard_normal((D, D)) / np.sqrt(D) for _ in range(depth)]
w_out = rng.standard_normal((10, D)) / np.sqrt(D)


def input_gradient_norms(use_batchnorm):
    """||dL/dh|| at the input of each of the 20 layers, input to output."""
    h, caches = x0, []
    for w in weights:
        h, linear_cache = linear.linear_forward(h, w)
        bn_cache = None
        if use_batchnorm:
            out, bn_cache = batchnorm.batchnorm2d_forward(h.reshape(N, D, 1, 1), np.ones(D), np.zeros(D),
                                                          np.zeros(D), np.ones(D), training=True)
            h = out.reshape(N, D)
        h, relu_cache = activation.relu_forward(h)
        caches.append((linear_cache, bn_cache, relu_cache))
    z, out_cache = linear.linear_forward(h, w_out)
    _, loss_cache = loss.softmax_cross_entropy_forward(z, y)
    g, _, _ = linear.linear_backward(loss.softmax_cross_entropy_backward(1.0, loss_cache), out_cache)
    norms = []
    for linear_cache, bn_cache, relu_cache in reversed(caches):
        g = activation.relu_backward(g, relu_cache)
        if bn_cache is not None:
            g, _, _ = batchnorm.batchnorm2d_backward(g.reshape(N, D, 1, 1), bn_cache)
            g = g.reshape(N, D)
        g, _, _ = linear.linear_backward(g, linear_cache)
        norms.append(float(np.linalg.norm(g)))
    return norms[::-1]


plain, with_bn = input_gradient_norms(False), input_gradient_norms(True)
print(f"{'layer':>5}  {'no BatchNorm':>12}  {'BatchNorm':>10}")
for layer in range(0, depth, 3):
    print(f"{layer + 1:>5}  {plain[layer]:12.3e}  {with_bn[layer]:10.3e}")
print(f"input/output-layer ratio: no BatchNorm {plain[0] / plain[-1]:.3g}, "
      f"BatchNorm {with_bn[0] / with_bn[-1]:.3g}")

# %% [markdown]
# **Q3 (on the experiment).** Without BatchNorm the gradient shrinks toward the
# input by about the same factor at every layer. Estimate that factor from the
# table and explain it from the variance of the weights and what ReLU does. With
# BatchNorm the gradient no longer fades: it *grows* toward the input. What does
# BatchNorm's backward multiply by at each layer (think of `inv_std`, and of the
# variance of what reaches each BatchNorm layer), and why is that more than the
# factor you found?
#
# *Your answer:*
#
