# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. The residual block
#
# Part: `residual_block_backward`, the method `ResidualBlock.backward` in
# `minires/models/blocks.py`. The derivation: `docs/backward/residual.md` (in
# this copy when it was made with `--with-docs`, otherwise in the course
# repository). The experiment at the end runs every part you wrote so far.
#
# A block computes $\text{out} = \text{relu}(F(x) + S(x))$: the branch $F$ is a
# list of layers run in order (conv, BN, ReLU, conv, BN), the shortcut $S$ is the
# identity or a projection. Backward, from the top:
#
# * through the final ReLU: $d = \partial L / \partial (F(x) + S(x))$;
# * the sum hands $d$ unchanged to both of its inputs;
# * through the branch, its layers in **reverse** order: $\partial L / \partial x$
#   along the branch is $J_F^\top d$;
# * through the shortcut: $d$ itself for the identity, or the projection's backward;
# * $x$ was used twice (it fanned out into the branch and the shortcut), so its
#   gradient is the **sum** of the two paths:
#
# $$\frac{\partial L}{\partial x} = J_F^\top d + J_S^\top d .$$
#
# Every module's `.backward(d)` returns the gradient of its input and stores its
# parameter gradients itself; you only route `d`.

# %%
# %load_ext autoreload
# %autoreload 2
import tempfile
from pathlib import Path

from minires import assignment, gradflow
from minires.plots_gradflow import plot_gradflow

assignment.notebook_setup()

# %%
assignment.check_parts("residual_block_backward")

# %% [markdown]
# ## Questions
#
# **Q1.** For a network of identity-shortcut blocks, write $\partial L / \partial
# x_\ell$ in terms of $\partial L / \partial x_{\ell + 1}$ and the branch's Jacobian
# (ignore the final ReLU of each block). Unroll it over all blocks above $\ell$: why
# can this gradient not vanish as depth grows, whatever the branches do?
#
# *Your answer:*
#
#
# **Q2.** The plain network below, with BatchNorm, has a gradient that *grows*
# toward the input. Why? (Hint: a BatchNorm layer's backward multiplies by `inv_std`,
# one over the standard deviation of *its* input; what are those standard deviations
# in a deep plain network at initialization, and what does the shortcut change?)
#
# *Your answer:*
#

# %% [markdown]
# ## Experiment: gradient flow, plain versus residual, from your own backward
#
# `minires.gradflow` builds plain-N and ResNet-N (the CIFAR family, 6n+2 layers)
# with the *same* weights, so the shortcuts are the only difference, runs one
# training-mode forward and backward on a batch of 8 Fashion-MNIST images (downloaded
# if they are not on this machine; `synthetic=True` asks for noise), and records the
# gradient norms layer by layer. In this copy every convolution, BatchNorm, ReLU,
# pooling and loss backward is yours, and so is the block's. Depths 8 and 20, in
# float64, take a few seconds.

# %%
data = gradflow.gradflow_at_init(depths=(8, 20), batch=8, seed=0)
for name, result in data["models"].items():
    norms = result["input_grad_norms"]
    print(f"{name:>9}: ||dL/dx|| at the first block's input {norms[0]:.3e}, at the last block's {norms[-1]:.3e} "
          f"(ratio {norms[0] / norms[-1]:.3g})")

figure = Path(tempfile.mkdtemp()) / "gradflow.png"
plot_gradflow(data, figure)
try:
    from IPython.display import Image, display
    display(Image(filename=str(figure)))
except ImportError:  # run as a plain script
    print(f"figure: {figure}")

# %% [markdown]
# **Q3 (on the experiment).** Compare the two networks' ratios at depth 8 and at
# depth 20. Which one changes more with depth, and what would you expect at depth
# 110? (`python -m minires gradflow --depths 110 --batch 8 --out runs/gradflow` measures it.)
#
# *Your answer:*
#
