"""Synthetic document pages (title, headers, paragraphs, lists, a table, a picture, page header
and footer), drawn with Pillow from a seed: data for document-layout detectors without any
download. Each page is 1024x1024, a portrait page letterboxed on grey as YOLO exports expect."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "model quantization calibration tensor range entropy histogram layer precision engine latency accuracy "
    "network kernel fusion detector output scale weight activation channel batch sample runtime report"
).split()


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _line(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def page(seed: int) -> Image.Image:
    rng = random.Random(seed)
    canvas = Image.new("RGB", (1024, 1024), (114, 114, 114))
    w, h = 724, 1024  # A4 proportions, centred
    doc = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(doc)
    y = 30
    draw.text((40, 12), _line(rng, 5), fill=(90, 90, 90), font=_font(11))  # page header
    draw.text((60, y + 20), _line(rng, 4).title(), fill="black", font=_font(30))  # title
    y += 80
    while y < h - 120:
        kind = rng.random()
        if kind < 0.2:
            draw.text((50, y), f"{rng.randint(1, 9)}. {_line(rng, 3).title()}", fill="black", font=_font(18))
            y += 34
        elif kind < 0.55:
            for _ in range(rng.randint(3, 7)):
                draw.text((50, y), _line(rng, rng.randint(9, 12)), fill="black", font=_font(13))
                y += 18
            y += 14
        elif kind < 0.7:
            for _ in range(rng.randint(2, 4)):
                draw.ellipse((56, y + 5, 62, y + 11), fill="black")
                draw.text((72, y), _line(rng, rng.randint(5, 9)), fill="black", font=_font(13))
                y += 19
            y += 12
        elif kind < 0.85 and y < h - 260:
            rows, cols = rng.randint(3, 6), rng.randint(3, 5)
            cw, rh = (w - 100) // cols, 22
            for r in range(rows + 1):
                draw.line((50, y + r * rh, 50 + cols * cw, y + r * rh), fill="black", width=1)
            for c in range(cols + 1):
                draw.line((50 + c * cw, y, 50 + c * cw, y + rows * rh), fill="black", width=1)
            for r in range(rows):
                for c in range(cols):
                    draw.text((56 + c * cw, y + r * rh + 4), _line(rng, 1), fill="black", font=_font(11))
            y += rows * rh + 24
        elif y < h - 300:
            ph = rng.randint(140, 220)
            for _ in range(12):  # a picture: overlapping shaded shapes
                x0, y0 = rng.randint(80, w - 200), rng.randint(y, y + ph - 40)
                shade = tuple(rng.randint(40, 220) for _ in range(3))
                draw.rectangle((x0, y0, x0 + rng.randint(30, 120), y0 + rng.randint(20, 60)), fill=shade)
            draw.rectangle((70, y, w - 70, y + ph), outline="black")
            draw.text((70, y + ph + 6), "Figure " + str(rng.randint(1, 9)) + ": " + _line(rng, 6), fill="black", font=_font(12))
            y += ph + 40
        else:
            y += 10
    draw.text((w // 2 - 10, h - 30), str(rng.randint(1, 300)), fill=(90, 90, 90), font=_font(11))  # page footer
    canvas.paste(doc, ((1024 - w) // 2, 0))
    return canvas


def write_pages(folder: Path, count: int, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        page(first_seed + k).save(folder / f"page_{first_seed + k:03d}.png")
    return folder
