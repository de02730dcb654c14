"""Inline SVG charts for the run report: ROC curves with a confidence band, calibration plots, PSI bars
and two overlaid histograms. Built from numbers and escaped text only (no JavaScript, no CDN), so the
report opens offline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from markupsafe import Markup

#: chart colours: this run / the curve, the reference / the band, a failing bar
BLUE, GREY, RED, GREEN = "#3b6ea8", "#9aa5b1", "#c0392b", "#2e8b57"


def _frame(width: int, height: int, title: str, body: str) -> Markup:
    from markupsafe import Markup, escape

    return Markup(
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{body}</svg>"
    )


def _square_axes(size: int, pad: int) -> tuple[str, float]:
    """Axes of a unit square plot; returns the SVG and the plot side in pixels."""
    side = size - 2 * pad
    base = pad + side
    return (
        f'<line x1="{pad}" y1="{base}" x2="{pad + side}" y2="{base}" stroke="#555"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{base}" stroke="#555"/>'
        f'<line x1="{pad}" y1="{base}" x2="{pad + side}" y2="{pad}" stroke="#ccc" stroke-dasharray="3,3"/>'
        f'<text x="{pad}" y="{size - 2}" font-size="9" text-anchor="middle">0</text>'
        f'<text x="{pad + side}" y="{size - 2}" font-size="9" text-anchor="middle">1</text>'
        f'<text x="{pad - 3}" y="{pad + 4}" font-size="9" text-anchor="end">1</text>',
        float(side),
    )


def roc_svg(
    fpr: Sequence[float],
    tpr: Sequence[float],
    *,
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    title: str,
    size: int = 180,
) -> Markup:
    """A ROC curve (FPR on x, TPR on y) with its pointwise bootstrap band shaded when given."""
    pad = 20
    axes, side = _square_axes(size, pad)

    def pt(x: float, y: float) -> str:
        return f"{pad + x * side:.1f},{pad + (1 - y) * side:.1f}"

    band = ""
    if low is not None and high is not None and len(low) == len(fpr) == len(high):
        ring = [pt(x, y) for x, y in zip(fpr, high, strict=True)] + [
            pt(x, y) for x, y in zip(reversed(fpr), reversed(low), strict=True)
        ]
        band = f'<polygon points="{" ".join(ring)}" fill="{GREY}" fill-opacity="0.35" stroke="none"/>'
    curve = " ".join(pt(x, y) for x, y in zip(fpr, tpr, strict=True))
    body = axes + band + f'<polyline points="{curve}" fill="none" stroke="{BLUE}" stroke-width="1.5"/>'
    body += f'<text x="{size / 2:.0f}" y="{size - 2}" font-size="9" text-anchor="middle">FPR</text>'
    return _frame(size, size, title, body)


def calibration_svg(
    predicted: Sequence[float | None],
    observed: Sequence[float | None],
    counts: Sequence[int],
    *,
    title: str,
    size: int = 180,
) -> Markup:
    """Observed positive rate against mean predicted probability per bin (dot area ~ images in the bin)."""
    pad = 20
    axes, side = _square_axes(size, pad)
    peak = max([int(c) for c in counts] + [1])
    dots = []
    for p, o, c in zip(predicted, observed, counts, strict=True):
        if p is None or o is None or not c:
            continue
        r = 2 + 4 * (int(c) / peak) ** 0.5
        dots.append(
            f'<circle cx="{pad + p * side:.1f}" cy="{pad + (1 - o) * side:.1f}" r="{r:.1f}" fill="{BLUE}">'
            f"<title>predicted {p:.2f}, observed {o:.2f}, n={int(c)}</title></circle>"
        )
    body = axes + "".join(dots)
    body += f'<text x="{size / 2:.0f}" y="{size - 2}" font-size="9" text-anchor="middle">predicted</text>'
    return _frame(size, size, title, body)


def psi_bars_svg(items: Sequence[tuple[str, float, float | None, str]], *, title: str, width: int = 520) -> Markup:
    """Horizontal PSI bars, one per (label, psi, threshold, status); the threshold is a tick on each bar."""
    from markupsafe import escape

    row, label_w, pad = 16, 190, 6
    height = pad * 2 + row * max(len(items), 1)
    top = max([v for _, v, _, _ in items] + [t for _, _, t, _ in items if t is not None] + [0.3])
    plot_w = width - label_w - 60
    parts = []
    for k, (label, value, threshold, status) in enumerate(items):
        y = pad + k * row
        w = plot_w * min(value, top) / top
        colour = RED if status == "fail" else GREEN if status == "pass" else GREY
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 11}" font-size="10" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{colour}">'
            f"<title>{escape(label)}: PSI {value:.3f} ({escape(status)})</title></rect>"
            f'<text x="{label_w + w + 3:.1f}" y="{y + 11}" font-size="9">{value:.2f}</text>'
        )
        if threshold is not None:
            x = label_w + plot_w * min(threshold, top) / top
            parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + row}" stroke="#222" stroke-width="1.5"/>')
    return _frame(width, height, title, "".join(parts))


def overlay_histogram_svg(
    current: Sequence[float], reference: Sequence[float], *, title: str, bins: int = 20, width: int = 300
) -> Markup:
    """Two normalised histograms on [0, 1]: this run (filled) and the reference (outline)."""
    import numpy as np

    height, left, bottom, top_pad = 120, 8, 16, 6
    plot_w, plot_h = width - 2 * left, height - bottom - top_pad
    shares = []
    for values in (current, reference):
        counts, _ = np.histogram(np.clip(np.asarray(values, dtype=float), 0, 1), bins=bins, range=(0.0, 1.0))
        shares.append(counts / max(int(counts.sum()), 1))
    peak = max(float(shares[0].max()), float(shares[1].max()), 1e-9)
    bar_w = plot_w / bins
    base = top_pad + plot_h
    bars = "".join(
        f'<rect x="{left + i * bar_w:.1f}" y="{base - plot_h * s / peak:.1f}" width="{bar_w - 1:.1f}" '
        f'height="{plot_h * s / peak:.1f}" fill="{BLUE}" fill-opacity="0.7"/>'
        for i, s in enumerate(shares[0])
    )
    outline = " ".join(
        f"{left + i * bar_w:.1f},{base - plot_h * s / peak:.1f} {left + (i + 1) * bar_w:.1f},{base - plot_h * s / peak:.1f}"
        for i, s in enumerate(shares[1])
    )
    body = (
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#555"/>'
        + bars
        + f'<polyline points="{outline}" fill="none" stroke="#222" stroke-width="1.2"/>'
        + f'<text x="{left}" y="{height - 3}" font-size="9">0</text>'
        + f'<text x="{left + plot_w}" y="{height - 3}" font-size="9" text-anchor="end">1</text>'
    )
    return _frame(width, height, title, body)
