"""The probe's outputs: report.json (everything), report.md (the tables) and accuracy_vs_depth.png."""

from __future__ import annotations

from pathlib import Path

from common.files import json_text, write_atomic

PROBES = ("attentive", "linear")


def markdown(report: dict) -> str:
    """Accuracy per depth and probe against chance, then the images per class and what was skipped."""
    n = report["n_layers"]
    lines = [
        f"# Representation probe of {report['model']}", "",
        f"{len(report['classes'])} classes; chance {report['chance']:.3f} (1 / classes), majority class of val "
        f"{report['majority']:.3f}. Features: hidden states after k of {n} blocks over one image's "
        f"{report['tokens_per_image']} tokens (k = 0: token embeddings), {report['dtype']} on {report['device']}. "
        "Top-1 accuracy on val:", "",
        "| depth k | k / layers | attentive probe | linear probe (mean-pooled) |", "| ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(f"| {row['depth']} | {row['depth'] / n:.2f} | {row['attentive']['top1']:.3f} | {row['linear']['top1']:.3f} |")
    lines += ["", "| class | train | val |", "| --- | ---: | ---: |"]
    counts = report["counts"]
    lines += [f"| {c} | {counts['train'].get(c, 0)} | {counts['val'].get(c, 0)} |" for c in report["classes"]]
    if report["val_shared_with_train"]:
        lines += ["", f"Warning: {report['val_shared_with_train']} val images have the tokens of a train image (the "
                  "same images in both splits?): their scores measure memory, not features."]
    lines += ["", f"Skipped: train {report['skipped']['train'] or 'none'}, val {report['skipped']['val'] or 'none'}.",
              "Probes: AdamW (lr {lr}, weight decay {weight_decay}), batches of {batch_size}, the epoch with the lowest "
              "loss on a {holdout:.0%} holdout of train kept, stopping {patience} epochs after it or at {epochs}; "
              "seed {seed}.".format(**report["training"])]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """accuracy_vs_depth.png: val top-1 of both probes against depth, with the chance level."""
    from lvm.plots import new_figure, save_figure  # matplotlib only where a plot is made

    depths = [row["depth"] for row in report["results"]]
    fig, ax = new_figure((6, 4))
    for kind, style in zip(PROBES, ("o-", "s--")):
        ax.plot(depths, [row[kind]["top1"] for row in report["results"]], style, label=f"{kind} probe")
    ax.axhline(report["chance"], color="gray", linestyle=":", label="chance")
    ax.set(xlabel=f"depth (blocks of {report['n_layers']})", ylabel="top-1 accuracy (val)", ylim=(0, 1.02),
           xticks=depths, title=f"{Path(report['model']).name}: {len(report['classes'])} classes")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def write(report: dict, out: Path) -> None:
    """report.json, report.md and the plot into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json_text(report))
    write_atomic(out / "report.md", markdown(report))
    plot(report, out / "accuracy_vs_depth.png")
