"""loss.svg over any loss curve (hypothesis): y labels never repeat and never run off the left edge, the x
axis has step ticks, every point lies inside the plot, and a NaN/inf value is left out instead of
breaking the drawing. Parsed with the standard library's XML parser."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from leantune.train.plot import CHAR_W, H, W, loss_svg

NS = "{http://www.w3.org/2000/svg}"

losses = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.floats(0, 1e-3), st.floats(5.9, 5.91),
                   st.sampled_from([float("nan"), float("inf")]))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(curve=st.lists(st.tuples(st.integers(1, 100_000), losses), min_size=1, max_size=40),
       evals=st.lists(st.tuples(st.integers(1, 100_000), losses), max_size=5))
def test_loss_svg_labels_are_distinct_unclipped_and_x_has_ticks(tmp_path_factory, curve, evals):
    path = tmp_path_factory.mktemp("svg") / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in curve)
                    + "".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in evals))
    svg = loss_svg(path)
    finite = [v for _, v in curve + evals if math.isfinite(v)]
    if not finite:
        assert svg == ""
        return
    root = ET.fromstring(svg)
    texts = root.findall(f"{NS}text")
    ylabels = [t for t in texts if t.get("text-anchor") == "end"]
    xlabels = [t for t in texts if t.get("text-anchor") == "middle" and t.text != "step"]
    assert ylabels and xlabels, svg
    values = [t.text for t in ylabels]
    assert len(values) == len(set(values)), values
    for t in ylabels:  # right-aligned at x: its left end is x - width
        assert float(t.get("x")) - len(t.text) * CHAR_W >= 0, (t.text, t.get("x"))
    steps = [int(t.text) for t in xlabels]
    assert steps == sorted(set(steps))
    for line in root.findall(f"{NS}polyline"):
        for xy in line.get("points").split():
            x, y = map(float, xy.split(","))
            assert 0 <= x <= W and 0 <= y <= H, xy
