"""A loss curve as a self-contained SVG (`loss.svg` in the run folder), with no plotting dependency.

Train loss per step in blue, eval loss in orange; open it in any browser.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.run_folder import LOSS_SVG, METRICS
from ..io.atomic import write_text
from .metrics import read_metrics

W, H, PAD = 640, 360, 48


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
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    pts = train + evals
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    ticks = "".join(
        f'<text x="{PAD - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
        f'<line x1="{PAD}" x2="{W - PAD}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>'
        for v in (y0 + (y1 - y0) * i / 4 for i in range(5)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>{ticks}'
            f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step ({x0}-{x1})</text>'
            f'<text x="{PAD}" y="20">loss: <tspan fill="#1f77b4">train</tspan> '
            f'<tspan fill="#ff7f0e">eval</tspan></text>'
            f'{_polyline(train, sx, sy, "#1f77b4", False)}{_polyline(evals, sx, sy, "#ff7f0e", True)}</svg>\n')


def write_loss_svg(run_dir: Path) -> Path | None:
    metrics = Path(run_dir) / METRICS
    svg = loss_svg(metrics) if metrics.exists() else ""
    if not svg:
        return None
    out = Path(run_dir) / LOSS_SVG
    write_text(out, svg)
    return out
