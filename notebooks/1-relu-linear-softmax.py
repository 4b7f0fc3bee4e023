# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. ReLU, Linear and the softmax loss
#
# Parts: `relu_backward`, `linear_backward`, `softmax_cross_entropy_forward`,
# `softmax_cross_entropy_backward`. You write each body in `minires/functional/`
# (the TODO there states the inputs, outputs and shapes); this notebook checks
# them, asks a few questions, and trains a tiny network on your own code.
#
# The derivations: `docs/backward/relu.md`, `docs/backward/linear.md` and
# `docs/backward/softmax-cross-entropy.md` (in this copy when it was made with
# `--with-docs`, otherwise in the course repository).
#
# Every backward has the same contract: `*_forward(...) -> (out, cache)` and
# `*_backward(dout, cache) -> gradients`, where `dout` is $\partial L / \partial
# \text{out}$ and each gradient has the shape of what it is the gradient of.

# %%
# The first cell: which minires this notebook runs (it must be this copy's).
# autoreload: after you edit a file in minires/, the experiments below use the new code.
# %load_ext autoreload
# %autoreload 2
import numpy as np

from minires import assignment
from minires.functional import activation, linear, loss

assignment.notebook_setup()

# %% [markdown]
# ## ReLU
#
# $\text{out} = \max(0, x)$ elementwise. Its derivative is 1 where $x > 0$ and 0
# where $x < 0$ (at exactly 0 we pick 0, as PyTorch does). The chain rule for an
# elementwise function multiplies `dout` by the local derivative, entry by entry.
# The cache is the forward's *output*, not its input.

# %%
assignment.check_parts("relu_backward")

# %% [markdown]
# ## Linear
#
# $\text{out} = x W^\top + b$ with $x \in \mathbb{R}^{N \times D}$,
# $W \in \mathbb{R}^{M \times D}$, $b \in \mathbb{R}^{M}$. Write one entry,
# $\text{out}_{nm} = \sum_d x_{nd} W_{md} + b_m$, and differentiate it:
# $\partial \text{out}_{nm} / \partial W_{md} = x_{nd}$. Every row $n$ of the batch
# used the same $W$ and $b$, so their gradients are **sums** over the batch. Check
# your answer by its shape: `dW` has the shape of `W`.

# %%
assignment.check_parts("linear_backward")

# %% [markdown]
# ## Softmax cross-entropy
#
# $p_{nk} = e^{z_{nk}} / \sum_j e^{z_{nj}}$ and
# $L = -\frac{1}{N} \sum_n \log p_{n, y_n}$.
#
# Forward: $e^{z}$ overflows for $z \gtrsim 710$ in float64 (89 in float32).
# Softmax does not change when a constant is added to a row, so choose the
# constant that makes every exponent $\le 0$; compute $\log p$ as
# $z - \log \sum_j e^{z_j}$ (log-sum-exp) rather than the log of a tiny $p$.
#
# Backward: $\partial L / \partial z_{nk} = \frac{1}{N} (p_{nk} - [k = y_n])$,
# times the upstream scalar `dloss`.

# %%
assignment.check_parts("softmax_cross_entropy_forward")

# %%
assignment.check_parts("softmax_cross_entropy_backward")

# %% [markdown]
# ## Questions
#
# **Q1.** `relu_backward` receives the forward's output `out`, not its input `x`.
# Why is the mask `out > 0` the same as `x > 0`, and why is keeping `out` free
# (no extra memory) in a network?
#
# *Your answer:*
#
#
# **Q2.** The loss is the *mean* over the batch. If you double the batch size and
# keep the learning rate, what happens to the size of `dW` of the last Linear layer,
# roughly? What would happen with a *sum* instead?
#
# *Your answer:*
#
#
# **Q3.** Your softmax forward must pass the check with logits around $\pm 3000$.
# Which line of a naive implementation returns `nan` there, and why does the
# gradient formula $p - \text{onehot}$ need no change for large logits?
#
# *Your answer:*
#

# %% [markdown]
# ## Experiment: overfit 64 images with your own backward passes
#
# A two-layer network (784 → 64 → 10) trained by plain gradient descent on 64
# Fashion-MNIST training images, every gradient computed by the four functions
# you wrote. A correct backward drives the training loss to almost zero within a
# few hundred steps: a network that cannot memorize 64 images has a bug. (If
# Fashion-MNIST is not on this machine it is downloaded; with no network, pass
# `synthetic=True` to `load_batch` for random noise with random labels: noise
# can be memorized too.)

# %%
from minires.gradflow import load_batch

images, labels, source = load_batch(64, seed=0, dtype=np.float64)
print("data:", source)
x = np.asarray(images).reshape(len(labels), -1)      # (64, 784)
y = np.asarray(labels)

rng = np.random.default_rng(0)
w1 = rng.standard_normal((64, x.shape[1])) * np.sqrt(2 / x.shape[1])
b1 = np.zeros(64)
w2 = rng.standard_normal((10, 64)) * np.sqrt(1 / 64)
b2 = np.zeros(10)
lr = 0.1
for step in range(301):
    h, cache1 = linear.linear_forward(x, w1, b1)
    a, cache2 = activation.relu_forward(h)
    z, cache3 = linear.linear_forward(a, w2, b2)
    value, cache4 = loss.softmax_cross_entropy_forward(z, y)
    dz = loss.softmax_cross_entropy_backward(1.0, cache4)
    da, dw2, db2 = linear.linear_backward(dz, cache3)
    dh = activation.relu_backward(da, cache2)
    _, dw1, db1 = linear.linear_backward(dh, cache1)
    for param, grad in ((w1, dw1), (b1, db1), (w2, dw2), (b2, db2)):
        param -= lr * grad
    if step % 50 == 0:
        accuracy = float((z.argmax(axis=1) == y).mean())
        print(f"step {step:3d}: loss {float(value):.4f}, training accuracy {accuracy:.0%}")

final = float(value)
print(f"final training loss {final:.4f}: " + ("memorized, as a correct backward should"
                                              if final < 0.05 else "NOT memorized: look for a bug"))
assert final < 0.05, "the tiny network did not memorize 64 images: one of the backward passes is off"

# %% [markdown]
# **Q4 (on the experiment).** Set `lr = 1.0` and run the cell again: the loss
# stalls instead of falling. Count the hidden units that are active for at least
# one of the 64 images, `int((h > 0).any(axis=0).sum())`, after each run. What
# happened to the others, and why can gradient descent never bring them back
# (look at what your `relu_backward` sends to their weights)?
#
# *Your answer:*
#
