"""Figures of the gradient-flow study (docs/gradient-flow.md).

* :func:`plot_gradflow` -- gradient norm per layer at initialization, plain vs
  residual on the same axes, one column per depth (``gradflow.json``);
* :func:`plot_gradflow_heatmap` -- per-layer gradient norm over training
  iterations, plain vs residual side by side;
* :func:`plot_degradation` -- training error (thin) and test error (bold) vs
  iterations, plain nets left and ResNets right, as Fig. 6 of He et al. 2016.

Every magnitude that spans decades is drawn on a log scale.
"""
import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PLAIN_COLOR, RESNET_COLOR = "tab:red", "tab:blue"


def _pretty(name):
    """'plain56' -> 'plain-56', 'resnet56' -> 'ResNet-56'."""
    for prefix, shown in (("plain", "plain-"), ("resnet", "ResNet-")):
        if name.startswith(prefix):
            return shown + name[len(prefix):]
    return name


def _condition(config):
    parts = ["with BatchNorm (train mode)" if config.get("batchnorm", True) else "without BatchNorm"]
    if config.get("shortcut", "A") != "A":
        parts.append(f"option-{config['shortcut']} shortcuts")
    if config.get("zero_init_residual"):
        parts.append("zero-init residual")
    return ", ".join(parts)


def plot_gradflow(data, path):
    """``gradflow.json`` data -> PNG: one column per depth; top row ||dL/dW|| per
    weight layer, bottom row ||dL/dx|| at each block's input; log y axes."""
    config, models = data["config"], data["models"]
    depths = config["depths"]
    fig, axes = plt.subplots(2, len(depths), figsize=(4.6 * len(depths), 7.2), squeeze=False)
    for col, depth in enumerate(depths):
        ax_w, ax_x = axes[0, col], axes[1, col]
        for kind, color, marker in (("plain", PLAIN_COLOR, "o"), ("resnet", RESNET_COLOR, "s")):
            name = f"{kind}{depth}"
            r = models[name]
            ratio = r["first_last_conv_ratio"]
            size = 3 if depth <= 56 else 2
            # A log axis cannot show 0: layers whose gradient is exactly 0 are left out and counted.
            shown = [(i, g) for i, g in enumerate(r["grad_norms"], 1) if g > 0]
            label = f"{_pretty(name)}  (first/last conv = {'n/a' if ratio is None else f'{ratio:.3g}'})"
            style, top_size = "-", size
            if len(shown) < len(r["grad_norms"]):
                label += f"\n{len(r['grad_norms']) - len(shown)} layers with \u2016dL/dW\u2016 = 0 not drawn"
                style, top_size = "none", 5  # no line across the missing layers
            ax_w.plot(*zip(*shown), marker=marker, ms=top_size, ls=style, lw=1.2, color=color, label=label)
            ax_x.plot(range(1, len(r["input_grad_norms"]) + 1), r["input_grad_norms"], marker=marker, ms=size,
                      lw=1.2, color=color, label=_pretty(name))
        ax_w.set_title(f"depth {depth}")
        ax_w.set_xlabel("weight layer (1 = first conv ... last = fc)")
        ax_x.set_xlabel("block (input \u2192 output)")
        for ax in (ax_w, ax_x):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.5)
            ax.legend(fontsize=8, loc="best")
        if col == 0:
            ax_w.set_ylabel("\u2016dL/dW\u2016 of the layer's weights")
            ax_x.set_ylabel("\u2016dL/dx\u2016 reaching the block's input")
    source = config.get("data", "")
    title = (f"Gradient norms at initialization, plain vs residual (same weights), {_condition(config)}\n"
             f"one batch of {config['batch']}: {source}")
    fig.suptitle(title, fontsize=10, color="darkred" if config.get("synthetic") else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradflow_heatmap(runs, path, title=None):
    """Per-layer ||dL/dW|| over training iterations (log scale), one panel per network.

    ``runs``: ``{name: {"layers": [...], "iterations": [...], "grad_norms": [[...], ...]}}``
    with one row of ``grad_norms`` per recorded iteration (input to output
    within the row). All panels share one logarithmic color scale.
    """
    names = list(runs)
    values = [numpy.asarray(runs[n]["grad_norms"], dtype=float) for n in names]
    positive = numpy.concatenate([v[(v > 0) & numpy.isfinite(v)] for v in values])
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-8), vmax=positive.max())
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 5.0), squeeze=False,
                             constrained_layout=True)  # leaves room for the title and the colorbar
    image = None
    for ax, name, v in zip(axes[0], names, values):
        iters = numpy.asarray(runs[name]["iterations"], dtype=float)
        # Log-scaled iterations: the first steps, where plain nets go wrong, get room.
        # Cell edges sit halfway (geometrically) between recorded iterations.
        mids = numpy.sqrt(iters[1:] * iters[:-1])
        x_edges = numpy.concatenate([[iters[0] / 1.5], mids, [iters[-1] * 1.1]])
        y_edges = numpy.arange(v.shape[1] + 1) + 0.5
        image = ax.pcolormesh(x_edges, y_edges, numpy.clip(v.T, norm.vmin, None), norm=norm, cmap="viridis")
        ax.set_xscale("log")
        ax.set_title(_pretty(name))
        ax.set_xlabel("training iteration (log scale)")
        ax.set_ylabel("weight layer (1 = first conv, top = fc)")
    cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    cbar.set_label("\u2016dL/dW\u2016 (log scale)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _zoom_on_the_second_half(ax, curves, color_of, plain):
    """An inset with the second half of the run, when every late value of a panel sits in
    the bottom 40% of the shared axis (typically the ResNets, a few points apart near 10%),
    where differences of a point cannot be read."""
    names = [n for n in curves if n.startswith("plain") == plain]
    if not names:
        return
    iterations = curves[names[0]]["iterations"]
    late = [i for i, it in enumerate(iterations) if it >= iterations[-1] / 2]
    if len(late) < 2:
        return
    values = [100 * curves[n][key][i] for n in names for key in ("train_error", "test_error") for i in late]
    bottom, top = ax.get_ylim()
    if max(values) > bottom + 0.4 * (top - bottom):  # the curves are far apart, or high: no zoom needed
        return
    inset = ax.inset_axes([0.42, 0.50, 0.55, 0.40])
    its = [iterations[i] for i in late]
    for name in names:
        c = curves[name]
        inset.plot(its, [100 * c["train_error"][i] for i in late], lw=0.9, color=color_of[name], marker=".")
        inset.plot(its, [100 * c["test_error"][i] for i in late], lw=2.6, color=color_of[name])
    pad = 0.1 * (max(values) - min(values)) + 0.2
    inset.set_ylim(min(values) - pad, max(values) + pad)
    inset.set_title("second half, zoomed (error %)", fontsize=8, pad=3)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)


def plot_degradation(data, path):
    """Degradation experiment data -> PNG in the style of He et al. (2016), Fig. 6.

    Left: plain nets, right: ResNets; thin lines = training error, bold = test
    error, each measured as ``data["config"]`` says (a run of this version:
    both in eval mode, on fixed subsets; an older run: the training
    mini-batches since the previous point).
    """
    curves, config = data["curves"], data["config"]
    fig, (ax_plain, ax_res) = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    colors, color_of = {}, {}  # one color per depth, the same in both panels
    palette = ["tab:orange", "tab:red", "tab:purple", "tab:brown"]
    highest = 0.0
    for name, c in curves.items():
        depth = int("".join(ch for ch in name if ch.isdigit()))
        color = color_of[name] = colors.setdefault(depth, palette[len(colors) % len(palette)])
        ax = ax_plain if name.startswith("plain") else ax_res
        ax.plot(c["iterations"], [100 * e for e in c["train_error"]], lw=0.9, color=color, alpha=0.9)
        ax.plot(c["iterations"], [100 * e for e in c["test_error"]], lw=2.6, color=color,
                label=f"{_pretty(name)}  (final test {100 * c['test_error'][-1]:.2f}%, "
                      f"train {100 * c['train_error'][-1]:.2f}%)")
        highest = max(highest, max(c["train_error"] + c["test_error"]))
    for ax, title in ((ax_plain, "plain networks"), (ax_res, "residual networks")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="gray", lw=0.9), Line2D([], [], color="gray", lw=2.6)]
        # a run that also kept the mini-batch error measured the training error in eval mode
        eval_mode = " (eval mode)" if "train_batch_error" in config else ""
        labels += [f"thin: training error{eval_mode}", "bold: test error"]
        # below the axes, where it hides no curve
        ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax_plain.set_ylabel("error (%)")
    ax_plain.set_ylim(0, min(100, 10 * math.ceil(10 * highest + 0.5)))
    for ax in (ax_plain, ax_res):
        _zoom_on_the_second_half(ax, curves, color_of, plain=ax is ax_plain)
    recipe = textwrap.fill(f"({config['preset']} preset: {config['description']})", 150)
    fig.suptitle(f"Degradation on {config['dataset']}: same recipe, same initial seed, same data order\n"
                 f"{recipe}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
