"""A loss curve as a self-contained SVG (`loss.svg` in the run folder), with no plotting dependency.

Train loss per step in blue, eval loss in orange; open it in any browser. Both axes get round ticks
(1, 2 or 5 times a power of ten); y labels carry as many decimals as it takes to tell them apart, and the
left margin grows with the widest one, so none is clipped. Non-finite values (a skipped NaN step) are left out.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint.run_folder import LOSS_SVG, METRICS
from ..io.atomic import write_text
from .metrics import read_metrics

W, H, PAD = 640, 360, 48
CHAR_W = 6.5  # px per character of an 11 px sans-serif label, a little generous: labels must not clip


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo if hi > lo else (abs(hi) or 1.0)
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        if v >= lo - step * 1e-9:
            ticks.append(v)
        v += step
    return ticks or [lo]


def tick_labels(ticks: list[float]) -> list[str]:
    """The shortest fixed-point labels that tell every tick apart (never two equal labels)."""
    for digits in range(0, 10):
        labels = [f"{t:.{digits}f}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{t:.6g}" for t in ticks]


def _polyline(points: list[tuple[float, float]], sx, sy, color: str, dots: bool) -> str:
    if not points:
        return ""
    xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    out = f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{xy}"/>'
    if dots:
        out += "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in points)
    return out


def loss_svg(metrics_jsonl: Path) -> str:
    train, evals = [], []
    for rec in read_metrics(metrics_jsonl):
        if _finite(rec.get("loss")):
            train.append((rec["step"], rec["loss"]))
        if _finite(rec.get("eval_loss")):
            evals.append((rec["step"], rec["eval_loss"]))
    pts = train + evals
    if not pts:
        return ""
    yt = nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    xt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts), n=6, integer=True)
    y0, y1 = min(yt[0], min(p[1] for p in pts)), max(yt[-1], max(p[1] for p in pts))
    x0, x1 = min(xt[0], min(p[0] for p in pts)), max(xt[-1], max(p[0] for p in pts))
    y1, x1 = (y1 if y1 > y0 else y0 + 1.0), (x1 if x1 > x0 else x0 + 1)
    ylabels = tick_labels(yt)
    left = PAD + int(max(len(s) for s in ylabels) * CHAR_W)  # room for the widest y label

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (W - left - PAD)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    grid = "".join(
        f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{label}</text>'
        f'<line x1="{left}" x2="{W - PAD}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>'
        for v, label in zip(yt, ylabels))
    grid += "".join(
        f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{H - PAD}" y2="{H - PAD + 4}" stroke="#888"/>'
        f'<text x="{sx(v):.1f}" y="{H - PAD + 16}" text-anchor="middle">{int(v)}</text>' for v in xt)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>{grid}'
            f'<line x1="{left}" x2="{W - PAD}" y1="{H - PAD}" y2="{H - PAD}" stroke="#888"/>'
            f'<text x="{(left + W - PAD) / 2:.1f}" y="{H - 8}" text-anchor="middle">step</text>'
            f'<text x="{left}" y="20">loss: <tspan fill="#1f77b4">train</tspan> '
            f'<tspan fill="#ff7f0e">eval</tspan></text>'
            f'{_polyline(train, sx, sy, "#1f77b4", False)}{_polyline(evals, sx, sy, "#ff7f0e", True)}</svg>\n')


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_loss_svg(run_dir: Path) -> Path | None:
    metrics = Path(run_dir) / METRICS
    svg = loss_svg(metrics) if metrics.exists() else ""
    if not svg:
        return None
    out = Path(run_dir) / LOSS_SVG
    write_text(out, svg)
    return out
