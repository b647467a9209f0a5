"""Files shipped with the package (class names, descriptions, synonyms) and the default cache folder."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_NAMES = ASSETS / "ntu60_class_names.txt"
EMBEDDED_DESCRIPTIONS = ASSETS / "ntu60_descriptions.txt"


def default_cache_dir() -> Path:
    """$SKELDIFF_CACHE, else ~/.cache/skeldiff."""
    return Path(os.environ.get("SKELDIFF_CACHE") or Path.home() / ".cache" / "skeldiff")
