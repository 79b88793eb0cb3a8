"""The docs say what the code does: the flag and preset tables in docs/guide.md are the ones
the code generates, and the README stays a short guide."""

from __future__ import annotations

from pathlib import Path

from sharelora.flags import reference
from sharelora.presets import table

ROOT = Path(__file__).resolve().parents[1]


def test_the_guide_lists_every_flag_and_preset_as_the_code_does():
    guide = (ROOT / "docs" / "guide.md").read_text()
    assert reference() in guide, "regenerate docs/guide.md's table: python -m sharelora.flags"
    assert table() in guide, "regenerate docs/guide.md's presets table: sharelora presets"


def test_the_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in ("docs/guide.md", "docs/methods.md", "docs/results.md", "docs/research-log.md"):
        assert link in readme and (ROOT / link).exists()
