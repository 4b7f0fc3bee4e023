# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Max pooling and convolution
#
# Parts: `maxpool2d_backward` (`minires/functional/pooling.py`) and
# `conv2d_backward` (`minires/functional/conv.py`). The derivations:
# `docs/backward/pooling.md` and `docs/backward/conv2d.md` (in this copy when it
# was made with `--with-docs`, otherwise in the course repository).

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np

from minires import assignment
from minires.functional import conv, pooling

assignment.notebook_setup()

# %% [markdown]
# ## Max pooling
#
# Each output is the maximum of one window: $\text{out}_{n c r s} = \max_{(i, j)}
# x_{n, c, r s_h + i - p_h, s s_w + j - p_w}$. Its derivative is 1 for the entry
# that won the window and 0 for the others, so each `dout` entry goes to exactly
# one input pixel: the forward saved which kernel offset $k = i k_w + j$ won, for
# every output. When the stride is smaller than the window, windows overlap and one
# pixel can win several of them: its gradient is the **sum** of what each window
# sends. Padding pixels ($-\infty$) never win; drop them at the end.

# %%
assignment.check_parts("maxpool2d_backward")

# %% [markdown]
# ## Convolution
#
# $\text{out}_{n f r s} = b_f + \sum_{c, i, j} W_{f c i j} \,
# x^{\text{pad}}_{n, c, r s_h + i, s s_w + j}$ (a cross-correlation, as in PyTorch).
#
# * $\partial L / \partial b_f$ and $\partial L / \partial W_{fcij}$: every output
#   position of every image used the same $b_f$ and $W_{fcij}$, so sum over $n$,
#   $r$ and $s$.
# * $\partial L / \partial x$: each input pixel sits in several windows and collects
#   one contribution from each; then cut the padding off.
#
# `im2col` turns the forward into one matrix product, `out_mat = W_mat @ cols`
# with `W_mat` of shape $(F, C k_h k_w)$ and `cols` of shape $(C k_h k_w, N H_o W_o)$.
# The backward of a matrix product you know from notebook 1; `col2im`, the adjoint
# of `im2col`, adds each column entry back onto the pixel it was copied from.

# %%
assignment.check_parts("conv2d_backward")

# %% [markdown]
# ## Questions
#
# **Q1.** A max-pool window holds two equal maxima (a tie). Which of them gets the
# gradient in your code, and does the gradient check notice? (The grader's inputs
# have no ties: why is that needed?)
#
# *Your answer:*
#
#
# **Q2.** Why is `col2im` an *adjoint* (its matrix is the transpose of im2col's)
# rather than an *inverse* of `im2col`? Where does that show in the backward?
#
# *Your answer:*
#

# %% [markdown]
# ## Experiment: which input pixels does one output see?
#
# Send a gradient of 1 back from one output pixel in the middle (0 everywhere else)
# and look at where $\partial \text{out} / \partial x$ is non-zero: that is the set
# of input pixels that output depends on. All weights are 1 and the input is
# positive, so nothing cancels by chance. First two 3x3 convolutions (padding 1),
# then the same two with a 2x2/2 max pool and a third 3x3 convolution after them.
# `#` marks a non-zero gradient.

# %%
rng = np.random.default_rng(0)
x = rng.uniform(0.5, 1.5, (1, 1, 16, 16))
ones = np.ones((1, 1, 3, 3))


def show(mask):
    rows, cols = np.nonzero(mask)
    for row in mask:
        print("".join("#" if v else "." for v in row))
    print(f"non-zero: {mask.sum()} pixels in a {np.ptp(rows) + 1} x {np.ptp(cols) + 1} box\n")


# two 3x3 convolutions
h1, c1 = conv.conv2d_forward(x, ones, None, 1, 1)
h2, c2 = conv.conv2d_forward(h1, ones, None, 1, 1)
g = np.zeros_like(h2)
g[0, 0, 8, 8] = 1.0
g, _, _ = conv.conv2d_backward(g, c2)
g, _, _ = conv.conv2d_backward(g, c1)
print("conv 3x3 -> conv 3x3:")
show(g[0, 0] != 0)

# conv -> conv -> max pool 2x2/2 -> conv
p, cp = pooling.maxpool2d_forward(h2, 2, 2, 0)
h3, c3 = conv.conv2d_forward(p, ones, None, 1, 1)
g = np.zeros_like(h3)
g[0, 0, 4, 4] = 1.0
g, _, _ = conv.conv2d_backward(g, c3)
g = pooling.maxpool2d_backward(g, cp)
g, _, _ = conv.conv2d_backward(g, c2)
g, _, _ = conv.conv2d_backward(g, c1)
print("conv 3x3 -> conv 3x3 -> max pool 2x2/2 -> conv 3x3:")
show(g[0, 0] != 0)

# %% [markdown]
# **Q3 (on the experiment).** Work out the receptive field of each stack with the
# rule $r_{\ell} = r_{\ell - 1} + (k_\ell - 1) \prod_{m < \ell} s_m$ and compare it
# with the boxes above. Why does the second pattern have holes, although a large
# enough change of any pixel in its box can change that output?
#
# *Your answer:*
#
