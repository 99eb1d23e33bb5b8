"""Small inline images for the report: a picture file -> ``data:`` URI of a downscaled JPEG/PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path


def data_uri(path: str | Path, max_side: int = 160, fmt: str = "JPEG", quality: int = 80) -> str | None:
    """``data:image/...;base64,...`` of the image at ``path`` shrunk to ``max_side`` px (long side), or None if
    the file is missing or unreadable. JPEG (default) keeps thumbnails to a few KB; PNG for plots."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format=fmt, **({"quality": quality, "optimize": True} if fmt == "JPEG" else
                                        {"optimize": True}))
    except (OSError, ValueError):
        return None
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()
