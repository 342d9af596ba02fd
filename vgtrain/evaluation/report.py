"""``report.html`` of ``vgtrain eval``: one self-contained page (no scripts, no network, images
embedded as base64 PNG, plots as inline SVG) with the metrics table, the training run's loss curves
and a grid of images with their references and predictions.

The loss curves come from the training run's CSV metrics log (``csv/version_*/metrics.csv``), which
the csv and wandb logger presets both write: no parsing of wandb's private binary run files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

CURVES = ("train/loss", "val/loss")
COLOURS = {"train/loss": "#4e79a7", "val/loss": "#e15759"}
THUMBNAIL = 192  # longest side of an embedded image, in pixels


@dataclass
class History:
    """Per-metric ``[(step, value)]`` from a training log, or why there is none."""

    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    source: str | None = None
    missing: str | None = None


def _add(curves: dict[str, list[tuple[float, float]]], row: dict[str, Any], step_key: str) -> None:
    step = row.get(step_key)
    for name in CURVES:
        value = row.get(name)
        if step in (None, "") or value in (None, ""):
            continue
        try:
            point = (float(step), float(value))
        except (TypeError, ValueError):
            continue
        if math.isfinite(point[1]):
            curves.setdefault(name, []).append(point)


def read_csv_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """A Lightning CSVLogger's metrics.csv (a ``step`` column, one column per metric)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            _add(curves, row, "step")
    return curves


def find_training_log(run_dir: Path) -> Path | None:
    """The newest CSV metrics log of a training run directory (every logger preset writes one)."""
    for pattern in ("csv/version_*/metrics.csv", "*/version_*/metrics.csv"):
        found = sorted(run_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def training_history(log: Path | None, run_dir: Path | None) -> History:
    """Loss curves from ``log`` (a CSVLogger's metrics.csv), else from ``run_dir``'s CSV log."""
    if log is None:
        if run_dir is None:
            return History(missing="the export's checkpoint is not in a `vgtrain train` run directory")
        log = find_training_log(run_dir)
        if log is None:
            return History(
                missing=f"no CSV metrics log in the training run {run_dir}; set report.training_log=PATH"
            )
    try:
        curves = read_csv_log(log)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return History(missing=f"cannot read the training log {log} ({error})")
    if not curves:
        return History(source=str(log), missing=f"{log} holds no {' or '.join(CURVES)} values")
    return History(curves=curves, source=str(log))


def loss_svg(curves: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 300) -> str:
    """Line plot of the curves (shared axes, step on x) as inline SVG."""
    points = [p for series in curves.values() for p in series]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 56, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + (step - x0) / (x1 - x0) * plot_w, top + (1 - (value - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="loss curves" font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        y = top + (1 - i / 4) * plot_h
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        step = x0 + (x1 - x0) * i / 4
        parts.append(
            f'<text x="{left + i / 4 * plot_w:.1f}" y="{height - 22}" text-anchor="middle">{step:.0f}</text>'
        )
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for index, (name, series) in enumerate(sorted(curves.items())):
        colour = COLOURS.get(name, "#59a14f")
        coords = [xy(step, value) for step, value in sorted(series)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        if len(coords) < 40:  # sparse series (validation): mark the points
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in coords)
        parts.append(
            f'<text x="{left + plot_w - 8}" y="{top + 14 + 14 * index}" text-anchor="end" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def image_data_uri(image: Image.Image) -> str:
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _format(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _fact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def _card_scores(metrics: dict[str, float]) -> str:
    shown = [
        (label, metrics[key]) for key, label in (("bleu_4", "BLEU-4"), ("cider", "CIDEr-D")) if key in metrics
    ]
    return "".join(f" &middot; {label} {value:.2f}" for label, value in shown)


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table.metrics { border-collapse: collapse; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
td.value { font-family: monospace; text-align: right; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.card { border: 1px solid #ddd; padding: 8px; }
.card img { width: 192px; image-rendering: pixelated; display: block; margin-bottom: 6px; }
.pred { font-weight: bold; }
.refs { color: #555; margin: 4px 0 0 1em; padding: 0; }
.note { color: #666; }
"""


def render_report(
    *,
    title: str,
    metrics: dict[str, float | None],
    notes: dict[str, str],
    details: dict[str, Any],
    history: History,
    examples: Sequence[dict[str, Any]],
) -> str:
    """The page. ``notes``: per metric, why it is null or how to read it; ``examples``: dicts with
    ``image`` (a data URI), ``prediction``, ``references``, ``key`` and per-image ``metrics``."""
    esc = html.escape
    rows = "".join(
        f"<tr><th>{esc(name)}</th><td class='value'>{_format(value)}</td>"
        f"<td class='note'>{esc(notes.get(name, ''))}</td></tr>"
        for name, value in metrics.items()
    )
    facts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(_fact(v))}</li>" for k, v in details.items())
    if history.curves:
        plot = loss_svg(history.curves) + f"<p class='note'>from {esc(history.source or '')}</p>"
    else:
        plot = f"<p class='note'>No loss curves: {esc(history.missing or 'no training log')}.</p>"
    cards = "".join(
        "<div class='card'>"
        f"<img src='{example['image']}' alt='{esc(str(example['key']))}'>"
        f"<div class='pred'>{esc(example['prediction']) or '<i>(empty)</i>'}</div>"
        "<ul class='refs'>" + "".join(f"<li>{esc(r)}</li>" for r in example["references"]) + "</ul>"
        f"<div class='note'>{esc(str(example['key']))}{_card_scores(example.get('metrics') or {})}</div></div>"
        for example in examples
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><ul>{facts}</ul>"
        f"<h2>Metrics</h2><table class='metrics' id='metrics'><tr><th>metric</th><th>value</th><th>note</th></tr>{rows}</table>"
        f"<h2>Training loss</h2><div id='loss'>{plot}</div>"
        f"<h2>Examples</h2><p class='note'>Prediction in bold, references below.</p>"
        f"<div class='grid' id='examples'>{cards}</div></body></html>\n"
    )
