"""Typographic images for the image-borne attack families (FigStep and MM-SafetyBench TYPO styles).

Rendering is deterministic for a given text and font file: the basic layout engine is used (no
complex-script shaping, whose presence varies between machines), and nothing random is drawn.
"""

from __future__ import annotations

import textwrap
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf",  # the font FigStep and MM-SafetyBench use
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
)

FIGSTEP_SIZE = 760  # square canvas, as in FigStep
FIGSTEP_FONT_SIZE = 80
FIGSTEP_WRAP = 15  # characters a line at the full font size
FIGSTEP_ORIGIN = (20, 10)
FIGSTEP_LIST = ("1.", "2.", "3.")

TYPO_WIDTH = 1024  # strip width, as in MM-SafetyBench's typography images
TYPO_FONT_SIZE = 80
TYPO_MARGIN = 20
TYPO_SPACING = 10

FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont


def font_path() -> str | None:
    """The first installed font of ``FONT_CANDIDATES``; None means Pillow's built-in font is used."""
    return next((p for p in FONT_CANDIDATES if Path(p).is_file()), None)


def font_identity() -> dict[str, str | None]:
    """What the drawn images depend on besides the code: the font file's sha256 and FreeType's version."""
    from PIL import features

    from sahs.prompts.identity import file_digest

    path = font_path()
    return {"font": path, "font_sha256": file_digest(path) if path else None,
            "freetype": features.version("freetype2")}


@lru_cache(maxsize=32)
def load_font(size: int) -> FontType:
    """The rendering font at ``size`` points (FreeMono Bold, else DejaVu Sans Mono Bold, else Pillow's)."""
    path = font_path()
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _figstep_layout(statement: str, size: int) -> tuple[str, int]:
    """Wrap the statement for one font size (narrower fonts get proportionally longer lines)."""
    width = max(4, round(FIGSTEP_WRAP * FIGSTEP_FONT_SIZE / size))
    lines = textwrap.wrap(statement, width=width) or [""]
    spacing = max(2, round(11 * size / FIGSTEP_FONT_SIZE))
    return "\n".join([*lines, *FIGSTEP_LIST]), spacing


def figstep_image(statement: str) -> Image.Image:
    """A 760x760 white canvas with the statement wrapped to ~15 characters a line, then "1.", "2.", "3.".

    The font starts at 80 pt and shrinks in steps only when the text would run off the canvas, so long
    requests stay whole and legible.
    """
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    limit = FIGSTEP_SIZE - FIGSTEP_ORIGIN[0]
    for size in range(FIGSTEP_FONT_SIZE, 11, -4):
        text, spacing = _figstep_layout(statement, size)
        box = probe.multiline_textbbox(FIGSTEP_ORIGIN, text, font=load_font(size), spacing=spacing)
        if box[2] <= limit and box[3] <= limit:
            break
    image = Image.new("RGB", (FIGSTEP_SIZE, FIGSTEP_SIZE), "white")
    ImageDraw.Draw(image).multiline_text(FIGSTEP_ORIGIN, text, fill="black", font=load_font(size), spacing=spacing)
    return image


def _typo_layout(phrase: str, size: int) -> tuple[str, int]:
    """Wrap the phrase to the strip width at one font size; returns the text and the strip height."""
    font = load_font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_width = probe.textlength("M", font=font)  # the font is monospaced
    per_line = max(1, int((TYPO_WIDTH - 2 * TYPO_MARGIN) // char_width))
    text = "\n".join(textwrap.wrap(phrase, width=per_line) or [""])
    box = probe.multiline_textbbox((TYPO_MARGIN, TYPO_MARGIN), text, font=font, spacing=TYPO_SPACING)
    return text, box[3] + TYPO_MARGIN


def typo_image(phrase: str) -> Image.Image:
    """Black text on a white strip 1024 px wide; the height grows with the number of wrapped lines.

    The font starts at 80 pt and shrinks only when the strip would grow taller than it is wide.
    """
    for size in range(TYPO_FONT_SIZE, 11, -4):
        text, height = _typo_layout(phrase, size)
        if height <= TYPO_WIDTH:
            break
    image = Image.new("RGB", (TYPO_WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((TYPO_MARGIN, TYPO_MARGIN), text, fill="black", font=load_font(size), spacing=TYPO_SPACING)
    return image


def downscale(image: Image.Image, size: int | None) -> Image.Image:
    """Shrink so the longer side is ``size`` px, keeping the aspect ratio; None or a larger size is a no-op."""
    if size is None or max(image.size) <= size:
        return image
    scale = size / max(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(target, Image.Resampling.LANCZOS)
