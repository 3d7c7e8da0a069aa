"""`cnn-job sweep report --plot`: val_acc against each swept option, one panel per option, and the
trials' learning curves (their metric per epoch), drawn with Pillow (no plotting library). Each
point is labelled with its trial; the best is ringed, a pruned trial marked with a grey ×."""

from __future__ import annotations

import io
import math
from pathlib import Path

PANEL_W, PANEL_H = 460, 340
LEFT, RIGHT, TOP, BOTTOM = 72, 20, 40, 58  # a panel's margins around its plot area
TITLE_H = 44
COLUMNS = 3
INK, GRID, POINT, BEST = (30, 30, 30), (225, 225, 225), (31, 119, 180), (214, 39, 40)
PRUNED = (150, 150, 150)


def save_plot(plan: dict, rows: list[dict], path: Path) -> None:
    from job.storage import atomic_write_bytes

    buffer = io.BytesIO()
    draw_sweep(plan, rows).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def draw_sweep(plan: dict, rows: list[dict]):
    from PIL import Image, ImageDraw, ImageFont

    options = plan["swept"] or ["trial"]
    done = [row for row in rows if row["val_acc"] is not None]
    finished = [row for row in done if row["status"] == "finished"]
    best = max(finished or done, key=lambda row: row["val_acc"], default=None)
    curves = any(row.get("history") for row in rows)
    panels = len(options) + curves
    columns = min(COLUMNS, panels)
    panel_rows = math.ceil(panels / columns)
    image = Image.new("RGB", (columns * PANEL_W, TITLE_H + panel_rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    fonts = {size: ImageFont.load_default(size=size) for size in (12, 14, 18)}
    title = f"sweep {plan['name']}: val_acc of {len(done)} of {len(rows)} trials"
    if best:
        title += f" (best: trial {best['trial']:03d}, {best['val_acc']:.2%})"
    draw.text((16, 12), title, fill=INK, font=fonts[18])
    accuracies = [row["val_acc"] for row in done]
    y_low, y_high = _padded(min(accuracies, default=0.0), max(accuracies, default=1.0))
    for number, option in enumerate(options):
        left = (number % columns) * PANEL_W
        top = TITLE_H + (number // columns) * PANEL_H
        _panel(draw, fonts, (left, top), option, option in plan["log_scale"], done, best,
               (y_low, y_high))
    if curves:
        number = len(options)
        _curves(draw, fonts, ((number % columns) * PANEL_W, TITLE_H + (number // columns) * PANEL_H),
                (plan.get("early_stop") or {}).get("metric", "val_acc"), rows, best)
    return image


def _curves(draw, fonts, origin, metric: str, rows: list[dict], best) -> None:
    """Each trial's `metric` per epoch from its recorded history: a line per trial, labelled at
    its last epoch; the best red, a pruned trial grey and ending in ×."""
    x0, y0 = origin[0] + LEFT, origin[1] + TOP
    x1, y1 = origin[0] + PANEL_W - RIGHT, origin[1] + PANEL_H - BOTTOM
    curves = [(row, [(entry["epoch"], entry[metric]) for entry in row.get("history", [])
                     if entry.get(metric) is not None]) for row in rows]
    curves = [(row, points) for row, points in curves if points]
    last_epoch = max(epoch for _, points in curves for epoch, _ in points)
    values = [value for _, points in curves for _, value in points]
    y_range = _padded(min(values), max(values))

    def x_at(epoch):
        return x0 + (epoch - 0.5) / last_epoch * (x1 - x0)

    def y_at(value):
        return y1 - (value - y_range[0]) / (y_range[1] - y_range[0]) * (y1 - y0)

    for tick in _ticks(*y_range):
        y = y_at(tick)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        label = f"{tick:.{_decimals(y_range)}%}" if metric == "val_acc" else _label(tick)
        draw.text((x0 - 8, y), label, fill=INK, font=fonts[12], anchor="rm")
    step = max(1, math.ceil(last_epoch / 10))
    for epoch in range(1, last_epoch + 1, step):
        x = x_at(epoch)
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x, y1 + 6), str(epoch), fill=INK, font=fonts[12], anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text(((x0 + x1) / 2, y1 + 30), "epoch (grey x: pruned)", fill=INK, font=fonts[14], anchor="mt")
    draw.text((x0, y0 - 8), f"{metric} per epoch", fill=INK, font=fonts[14], anchor="ls")
    for row, points in sorted(curves, key=lambda curve: curve[0] is best):  # the best on top
        colour = PRUNED if row["status"] == "pruned" else BEST if row is best else POINT
        line = [(x_at(epoch), y_at(value)) for epoch, value in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        x, y = line[-1]
        if row["status"] == "pruned":
            _cross(draw, x, y)
        draw.text((x + 8, y - 4), f"{row['trial']}", fill=INK, font=fonts[12], anchor="ls")


def _cross(draw, x: float, y: float) -> None:
    draw.line([(x - 6, y - 6), (x + 6, y + 6)], fill=PRUNED, width=3)
    draw.line([(x - 6, y + 6), (x + 6, y - 6)], fill=PRUNED, width=3)


def _panel(draw, fonts, origin, option, log_scale, rows, best, y_range) -> None:
    x0, y0 = origin[0] + LEFT, origin[1] + TOP
    x1, y1 = origin[0] + PANEL_W - RIGHT, origin[1] + PANEL_H - BOTTOM
    values = [row["trial"] if option == "trial" else row["settings"].get(option) for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    log_scale = log_scale and numeric and all(v > 0 for v in values)
    if numeric and values:
        low, high = min(values), max(values)
        if log_scale:
            low, high = math.log10(low), math.log10(high)
        low, high = _padded(low, high)
        whole = all(isinstance(v, int) for v in values) and not log_scale  # seeds, batch sizes
        x_ticks = [(t, _log_label(t) if log_scale else _label(t)) for t in _ticks(low, high)
                   if not whole or t == int(t)]
        position = (lambda v: math.log10(v)) if log_scale else float
    else:  # text, flags, or nothing yet: one evenly spaced column per value
        categories = sorted({str(v) for v in values})
        low, high = -0.5, max(len(categories) - 0.5, 0.5)
        x_ticks = [(i, c) for i, c in enumerate(categories)]
        position = lambda v: categories.index(str(v))  # noqa: E731

    def x_at(value):
        return x0 + (value - low) / (high - low) * (x1 - x0)

    def y_at(accuracy):
        return y1 - (accuracy - y_range[0]) / (y_range[1] - y_range[0]) * (y1 - y0)

    for tick in _ticks(*y_range):
        y = y_at(tick)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((x0 - 8, y), f"{tick:.{_decimals(y_range)}%}", fill=INK, font=fonts[12],
                  anchor="rm")
    for tick, label in x_ticks:
        x = x_at(tick)
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x, y1 + 6), label, fill=INK, font=fonts[12], anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    axis = option + (" (log scale)" if log_scale else "")
    draw.text(((x0 + x1) / 2, y1 + 30), axis, fill=INK, font=fonts[14], anchor="mt")
    draw.text((x0, y0 - 8), "val_acc", fill=INK, font=fonts[14], anchor="ls")
    for row, value in zip(rows, values):
        x, y = x_at(position(value)), y_at(row["val_acc"])
        if row is best:
            draw.ellipse([x - 9, y - 9, x + 9, y + 9], outline=BEST, width=3)
        if row["status"] == "pruned":  # its last recorded val_acc, not a finished run's
            _cross(draw, x, y)
        else:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=BEST if row is best else POINT)
        draw.text((x + 8, y - 4), f"{row['trial']}", fill=INK, font=fonts[12], anchor="ls")


def _padded(low: float, high: float) -> tuple[float, float]:
    """A range around [low, high] with a margin, never empty."""
    span = high - low or abs(high) * 0.1 or 1.0
    return low - span * 0.12, high + span * 0.12


def _ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round values between low and high: steps of 1, 2 or 5 times a power of ten."""
    raw = (high - low) / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _decimals(y_range: tuple[float, float]) -> int:
    step = (y_range[1] - y_range[0]) / 6 * 100  # in percent
    return max(0, min(3, -math.floor(math.log10(step)) + 1)) if step > 0 else 1


def _label(value: float) -> str:
    return f"{value:.4g}"


def _log_label(exponent: float) -> str:
    return f"{10 ** exponent:.3g}"
