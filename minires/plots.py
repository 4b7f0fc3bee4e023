"""Figures: training curves (and, in gradflow, gradient-norm plots).

matplotlib is imported with the non-interactive Agg backend, so figures are
written to files on machines without a display.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history, path, title=None):
    """Loss and accuracy of a training run (``history.json`` records) -> PNG.

    Where each point sits says what it measures. A training number of epoch e
    (loss or accuracy) is the mean over that epoch's batches, taken while the
    weights were changing: it is drawn at e - 0.5, the middle of the epoch it
    averages. A test number is measured once, after epoch e, with the final
    weights in eval mode: it is drawn at e. (So in epoch 1 the training
    accuracy, which includes the first, worst batches, can be below the test
    accuracy.) Left: per-batch training loss (thin, averaged in chunks) on a
    log axis with labelled ticks. Right: accuracy, with each test value labelled
    (beyond six epochs: the best and the last).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = [r["epoch"] for r in history]
    middles = [e - 0.5 for e in epochs]
    batch_x, batch_y = [], []
    for r in history:
        losses = r.get("batch_losses") or []
        for i, v in enumerate(losses):
            batch_x.append(r["epoch"] - 1 + (i + 1) / len(losses))
            batch_y.append(v)
    if batch_x:
        ax_loss.plot(batch_x, batch_y, lw=0.8, alpha=0.5, color="tab:blue", label="train loss, per batch")
    ax_loss.plot(middles, [r["train_loss"] for r in history], "o", color="tab:blue",
                 label="train loss, mean over the epoch\n(weights changing; drawn mid-epoch)")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", color="tab:red",
                 label="test loss, after the epoch")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss (log scale)")
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3, which="both")
    ax_acc.plot(middles, [100 * r["train_acc"] for r in history], "o", color="tab:blue",
                label="train, mean over the epoch\n(weights changing; drawn mid-epoch)")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], "s-", color="tab:red",
                label="test, after the epoch (eval mode)")
    test_accs = [r["test_acc"] for r in history]
    if len(epochs) <= 6:  # every test value, to the right of its point
        labels = [(e, acc, "", (9, 0), "left", "center") for e, acc in zip(epochs, test_accs)]
    else:  # a longer run: only the best (above its point) and the last (below), so no label hides another
        best = test_accs.index(max(test_accs))
        if best == len(epochs) - 1:
            labels = [(epochs[-1], test_accs[-1], "best and last ", (0, 9), "center", "bottom")]
        else:
            labels = [(epochs[best], test_accs[best], "best ", (0, 9), "center", "bottom"),
                      (epochs[-1], test_accs[-1], "last ", (0, -9), "center", "top")]
    for e, acc, what, offset, ha, va in labels:
        ax_acc.annotate(f"{what}{100 * acc:.1f}%", (e, 100 * acc), textcoords="offset points", xytext=offset,
                        ha=ha, va=va, fontsize=8, color="tab:red",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.grid(alpha=0.3)
    if epochs:
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(0, max(epochs) + 0.45)
            ax.set_xticks(range(0, max(epochs) + 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
