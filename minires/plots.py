"""Figures: training curves (and, in gradflow, gradient-norm plots).

matplotlib is imported with the non-interactive Agg backend, so figures are
written to files on machines without a display.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history, path, title=None):
    """Loss and error of a training run (``history.json`` records) -> PNG.

    Left: per-batch training loss (thin, averaged in chunks) and per-epoch
    train/test loss. Right: train/test accuracy per epoch.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in history]
    batch_x, batch_y = [], []
    for r in history:
        losses = r.get("batch_losses") or []
        for i, v in enumerate(losses):
            batch_x.append(r["epoch"] - 1 + (i + 1) / len(losses))
            batch_y.append(v)
    if batch_x:
        ax_loss.plot(batch_x, batch_y, lw=0.8, alpha=0.5, color="tab:blue", label="train loss (batches)")
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue", label="train loss (epoch)")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", color="tab:red", label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", color="tab:blue", label="train")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], "s-", color="tab:red", label="test")
    for e, acc in zip(epochs, [r["test_acc"] for r in history]):
        ax_acc.annotate(f"{100 * acc:.1f}%", (e, 100 * acc), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=8, color="tab:red")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if epochs:
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(0, max(epochs) + 0.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
