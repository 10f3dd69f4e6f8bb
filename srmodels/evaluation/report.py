"""Pictures, tables and plots for the ``test`` and ``score`` stages. Pure functions; no MLflow here.

* :func:`weight_map_image`: where each member wins, as an RGB picture with a legend.
* :func:`markdown_table`: the model comparison table (one row per model, PSNR-Y / SSIM-Y / PSNR-RGB per scored
  set, best value bold), in the spirit of team 27's Table 3.
* :func:`sets_table`: one model (or several) on benchmark sets, a column per set, ``PSNR / SSIM`` cells: the
  layout of SR papers (``srmodels eval``).
* :func:`panel_image`: captioned crops side by side (the score stage's comparison panels).
* :func:`write_csv`, :func:`bar_chart_png`, :func:`curves_png`: the same numbers as files DVC and MLflow keep.

Every file is written atomically (temporary file, then rename) so an interrupted stage never leaves a truncated
output, and byte-identically for identical inputs so DVC sees no spurious change (PNGs carry no matplotlib
version or date; rendering uses matplotlib's defaults, not the user's matplotlibrc).
"""
from __future__ import annotations

import colorsys
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from srmodels.core.files import write_bytes, write_text

log = logging.getLogger(__name__)

# Colours (RGB) of the models the project knows, from the Okabe-Ito colour-blind-safe palette, so a member
# keeps its colour in every picture and every run whatever the order of fusion.members.
KNOWN_COLOURS: dict[str, tuple[int, int, int]] = {
    "dat": (213, 94, 0),        # vermillion
    "swinir": (0, 114, 178),    # blue
    "rfdn": (0, 158, 115),      # bluish green
    "rrdbnet": (230, 159, 0),   # orange
    "fusion": (204, 121, 167),  # reddish purple
    "bicubic": (128, 128, 128),  # grey
}
# Handed out, in this order, to names not in KNOWN_COLOURS (skipping colours already taken).
SPARE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (86, 180, 233), (240, 228, 66), (204, 121, 167), (230, 159, 0), (0, 158, 115), (0, 114, 178),
    (213, 94, 0), (0, 0, 0), (128, 128, 128), (140, 86, 75),
)
DEFAULT_METRICS: tuple[tuple[str, str], ...] = (("psnr_y", "PSNR-Y"), ("ssim_y", "SSIM-Y"), ("psnr_rgb", "PSNR-RGB"))
FIGSIZE = (6.4, 4.0)
DPI = 100
# No 'Software' (matplotlib version) chunk: the PNG bytes depend on the data only.
PNG_METADATA: dict[str, Any] = {"Software": None}


def colours_for(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """A distinct RGB colour per name: the fixed one for known models, then spare colours in order."""
    out: list[tuple[int, int, int] | None] = []
    taken: set[tuple[int, int, int]] = set()
    for name in names:
        colour = KNOWN_COLOURS.get(name.lower())
        if colour is not None and colour not in taken:
            taken.add(colour)
            out.append(colour)
        else:
            out.append(None)
    spare = [c for c in SPARE_COLOURS if c not in taken]
    extra = 0
    for i, colour in enumerate(out):
        if colour is None:
            if spare:
                out[i] = spare.pop(0)
            else:  # more members than colours: evenly spread hues, still deterministic
                r, g, b = colorsys.hsv_to_rgb((extra * 0.618034) % 1.0, 0.75, 0.9)
                out[i] = (round(r * 255), round(g * 255), round(b * 255))
                extra += 1
    return [c for c in out if c is not None]


# --------------------------------------------------------------------------------------------------------------
# Weight map
# --------------------------------------------------------------------------------------------------------------
def weight_map_image(weights: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """RGB picture (HxWx3 uint8) of which member the fusion trusts where, with a legend strip below.

    ``weights`` is (N, H, W), one map per member in the order of ``names``. Each pixel is the weight-mixed
    colour of the members (a pixel with weight 1 on DAT is pure DAT colour); weights are normalised per
    pixel so maps that do not sum to one still read as shares. The legend shows each name, its colour and its
    mean weight over the image. The picture is widened (white) when the legend needs more room than the map.
    """
    w = np.nan_to_num(np.asarray(weights, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if w.ndim != 3:
        raise ValueError(f"weights: expected (N, H, W), got shape {w.shape}")
    if w.shape[0] != len(names):
        raise ValueError(f"weights has {w.shape[0]} maps but {len(names)} names: {list(names)}")
    w = np.clip(w, 0.0, None)
    total = w.sum(axis=0, keepdims=True)
    share = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    palette = np.asarray(colours_for(names), dtype=np.float64)             # (N, 3)
    mixed = np.einsum("nhw,nc->hwc", share, palette)
    mixed[total[0] <= 0] = 255.0  # no weight at all: white, not a misleading black
    picture = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    means = [float(share[i].mean()) for i in range(len(names))]
    return _with_legend(picture, [f"{n} {m:.0%}" for n, m in zip(names, means)], colours_for(names))


def _with_legend(picture: np.ndarray, labels: Sequence[str], colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``picture`` above a white strip of colour swatches and labels, wrapped onto as many lines as needed."""
    h, w = picture.shape[:2]
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    scale = min(1.5, max(0.4, w / 1000))  # readable on a 2K map without swamping a small crop
    (_, text_h), baseline = cv2.getTextSize("Ag", font, scale, thickness)
    pad, swatch, gap = max(4, text_h // 2), text_h + baseline, max(8, text_h)
    items = [(label, colour, cv2.getTextSize(label, font, scale, thickness)[0][0]) for label, colour in
             zip(labels, colours)]
    widths = [swatch + pad + tw for _, _, tw in items]
    canvas_w = max(w, max(widths, default=0) + 2 * pad)
    # Lay out left to right, starting a new line when the next entry would not fit.
    lines: list[list[int]] = [[]]
    x = pad
    for i, item_w in enumerate(widths):
        if lines[-1] and x + item_w > canvas_w - pad:
            lines.append([])
            x = pad
        lines[-1].append(i)
        x += item_w + gap
    line_h = swatch + pad
    strip_h = len(lines) * line_h + pad
    canvas = np.full((h + strip_h, canvas_w, 3), 255, dtype=np.uint8)
    canvas[:h, :w] = picture
    for row, members in enumerate(lines):
        y0 = h + pad + row * line_h
        x = pad
        for i in members:
            label, colour, _ = items[i]
            cv2.rectangle(canvas, (x, y0), (x + swatch - 1, y0 + swatch - 1), tuple(int(c) for c in colour), -1)
            cv2.rectangle(canvas, (x, y0), (x + swatch - 1, y0 + swatch - 1), (0, 0, 0), 1)
            cv2.putText(canvas, label, (x + swatch + pad, y0 + text_h + (swatch - text_h - baseline) // 2),
                        font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
            x += widths[i] + gap
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Comparison panels
# --------------------------------------------------------------------------------------------------------------
def panel_image(rows: Sequence[Sequence[tuple[str, np.ndarray]]], tile: int = 144,
                legend: Sequence[str] = ()) -> np.ndarray:
    """Rows of captioned crops side by side (RGB uint8): each crop scaled to ``tile`` px by pixel repetition
    (nearest neighbour, so the pictures show the pixels that were scored), its caption in a strip above it;
    ``legend`` names the weight map's colours (as :func:`weight_map_image` assigns them) in a strip below."""
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    (_, text_h), baseline = cv2.getTextSize("Ag", font, scale, thickness)
    cap_h, gap = text_h + baseline + 6, 4
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (cap_h + tile + gap) + gap, cols * (tile + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        y = gap + i * (cap_h + tile + gap)
        for j, (caption, crop) in enumerate(row):
            x = gap + j * (tile + gap)
            canvas[y + cap_h:y + cap_h + tile, x:x + tile] = cv2.resize(crop, (tile, tile),
                                                                         interpolation=cv2.INTER_NEAREST)
            cv2.putText(canvas, caption, (x + 2, y + text_h + 2), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return _with_legend(canvas, [f"weights: {n}" for n in legend], colours_for(legend)) if legend else canvas


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------
def _decimals(metric: str) -> int:
    return 4 if metric.lower().startswith("ssim") else 2


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def markdown_table(rows: Sequence[Mapping[str, Any]], *, metrics: Sequence[tuple[str, str]] = DEFAULT_METRICS,
                   sets: Sequence[str] | None = None, models: Sequence[str] | None = None,
                   model_key: str = "model", set_key: str = "set") -> str:
    """Markdown comparison table: one row per model, a column per (scored set, metric), best value in bold.

    ``rows`` are long-form records such as ``{"model": "dat+x8", "set": "test", "psnr_y": 28.1, "ssim_y": 0.81,
    "psnr_rgb": 26.5}`` (the same records :func:`write_csv` writes). Models and sets keep their first-seen
    order unless ``models`` / ``sets`` give one. ``metrics`` are ``(key, header)`` pairs, higher is better for
    all of them; SSIM is shown with 4 decimals, the rest with 2. A value equal to the best *as displayed* is
    bold as well (ties), and a column with a single value has no bold. Missing values show as an en dash.
    """
    models = list(models) if models is not None else list(dict.fromkeys(str(r[model_key]) for r in rows))
    sets = list(sets) if sets is not None else list(dict.fromkeys(str(r[set_key]) for r in rows))
    table: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        cell = (str(r[model_key]), str(r[set_key]))
        if cell in table:
            raise ValueError(f"two rows for model {cell[0]!r} on set {cell[1]!r}")
        table[cell] = r
    columns = [(s, key, label) for s in sets for key, label in metrics]
    header = ["Model"] + [f"{s} {label}" for s, _, label in columns]
    body = [[m] for m in models]
    for s, key, _ in columns:
        values = [_number(table.get((m, s), {}).get(key)) for m in models]
        shown = [None if v is None else f"{v:.{_decimals(key)}f}" for v in values]
        present = [v for v in values if v is not None]
        best = f"{max(present):.{_decimals(key)}f}" if len(present) > 1 else None
        for line, text in zip(body, shown):
            line.append("–" if text is None else f"**{text}**" if text == best else text)
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def sets_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], counts: Mapping[str, int], *,
               psnr_key: str = "psnr_y", ssim_key: str = "ssim_y") -> str:
    """Markdown table in the layout of SR papers: one row per model, one column per benchmark set.

    ``results[model][set]`` holds the set's mean scores; ``counts`` gives the sets, in column order, and their
    image counts (shown in the header: ``Set5 (5)``). Each cell is ``PSNR / SSIM`` with 2 and 4 decimals, the
    precision papers print. With several models the best PSNR and the best SSIM of a column (as displayed,
    ties included) are bold, as in :func:`markdown_table`; a missing value shows as an en dash.
    """
    models = list(results)
    header = ["Model"] + [f"{s} ({n})" for s, n in counts.items()]
    body = [[m] for m in models]
    for s in counts:
        cells: list[list[str]] = [[] for _ in models]
        for key in (psnr_key, ssim_key):
            shown = [None if (v := _number(results[m].get(s, {}).get(key))) is None else f"{v:.{_decimals(key)}f}"
                     for m in models]
            present = [float(t) for t in shown if t is not None]
            best = f"{max(present):.{_decimals(key)}f}" if len(present) > 1 else None
            for cell, text in zip(cells, shown):
                cell.append("–" if text is None else f"**{text}**" if text == best else text)
        for line, cell in zip(body, cells):
            line.append(" / ".join(cell))
    lines = ["| " + " | ".join(header) + " |", "|:---|" + ":---:|" * len(counts)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def comparison_table(comparisons: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Markdown table of paired comparisons (``srmodels.metrics.statistics``): one row per set and pair of models."""
    lines = ["| set | a vs b | mean PSNR-Y a - b (dB) | 95% interval | wins / losses / ties of a | verdict |",
             "|:---|:---|---:|:---:|:---:|:---|"]
    notes = set()
    for set_name, pairs in comparisons.items():
        for label, c in pairs.items():
            lines.append(f"| {set_name} | {label} | {c['mean_diff']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
                         f"| {c['wins']} / {c['losses']} / {c['ties']} | {c['verdict']} |")
            if "warning" in c:
                notes.add(f"{set_name}: {c['warning']}.")
    return "\n".join(lines + [""] + sorted(notes)) + "\n"


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows as CSV: the union of their keys as columns in first-seen order, missing values empty.

    Floats keep full precision (``repr``) so the CSV is a faithful record, not a rounded display.
    """
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------
def new_figure() -> Any:
    """A figure of the reports' size and resolution; save it with :func:`save_png`."""
    # A bare Figure on an Agg canvas: no pyplot, no GUI backend, no global state shared with other code.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` (atomically), the same bytes for the same figure: no version, no date."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    write_bytes(path, buf.getvalue())
    return Path(path)


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def bar_chart_png(path: str | Path, results: Mapping[str, float], title: str,
                  ylabel: str = "PSNR-Y (dB)") -> Path:
    """One bar per model, in the given order, labelled with its value; models keep their fixed colours.

    The y axis does not start at zero: PSNR differences of a tenth of a dB would be invisible otherwise.
    """
    from matplotlib import style

    with style.context("default"):
        fig = new_figure()
        ax = fig.add_subplot()
        names = list(results)
        values = [_number(results[n]) for n in names]
        finite = [v for v in values if v is not None]
        if finite:
            # 'dat+x8' shares DAT's colour: the bar chart and the weight map speak the same colour language.
            bases = list(dict.fromkeys(n.split("+")[0] for n in names))
            base_colour = dict(zip(bases, colours_for(bases)))
            colours = [tuple(c / 255 for c in base_colour[n.split("+")[0]]) for n in names]
            x = np.arange(len(names))
            bars = ax.bar(x, [v if v is not None else 0.0 for v in values], color=colours, edgecolor="black",
                          linewidth=0.5)
            for bar, v in zip(bars, values):
                if v is None:
                    bar.set_visible(False)
                ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2,
                            v if v is not None else min(finite)), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 2), textcoords="offset points")
            lo, hi = min(finite), max(finite)
            span = max(hi - lo, 0.1)
            ax.set_ylim(lo - 0.6 * span, hi + 0.25 * span)
            ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        else:
            _no_data(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return save_png(fig, path)


def read_curve(path: str | Path, column: str) -> list[tuple[int, float]]:
    """(epoch, value) rows of a training curve.csv, skipping empty cells (no training loss at epoch 0)."""
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r[column])) for r in csv.DictReader(f) if r[column] not in ("", "nan")]


def curves_png(path: str | Path, curves: Mapping[str, Sequence[tuple[float, float]]], ylabel: str, title: str,
               xlabel: str = "epoch") -> Path:
    """Line per named curve from ``(epoch, value)`` points (e.g. training loss or validation PSNR per epoch)."""
    from matplotlib import style

    with style.context("default"):
        fig = new_figure()
        ax = fig.add_subplot()
        from matplotlib.ticker import MaxNLocator

        drawn, whole = 0, True
        for (name, points), rgb in zip(curves.items(), colours_for(list(curves))):
            pts = [(float(x), float(y)) for x, y in points]
            if not pts:
                continue
            xs, ys = zip(*pts)
            whole = whole and all(x.is_integer() for x in xs)
            ax.plot(xs, ys, marker="o" if len(pts) <= 50 else None, markersize=3, linewidth=1.2, label=name,
                    color=tuple(c / 255 for c in rgb))  # a member's curve wears its weight-map colour
            drawn += 1
        if drawn and whole:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.25 ticks
        if drawn:
            ax.legend(loc="best", fontsize=8)
        else:
            _no_data(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_png(fig, path)
