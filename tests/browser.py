"""Headless Chromium for the tests of the HTML reports: what a page's DOM holds once it has loaded, and how
much of a screenshot is not white. Tests that use it skip when no Chromium is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

#: Appended to a copy of a page: once it has loaded, the body records what a reader would see.
PROBE = """<script>
addEventListener("load", () => {
  const body = document.body;
  body.dataset.probed = "yes";
  body.dataset.images = [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length;
  body.dataset.scrollWidth = document.documentElement.scrollWidth;
  body.dataset.innerWidth = window.innerWidth;
});
</script>"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def loaded_dom(browser: str, page: Path, tmp: Path, width: int = 1000) -> tuple[str, dict[str, str]]:
    """The DOM of ``page`` once loaded in a window ``width`` pixels wide, and what :data:`PROBE` recorded."""
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [
            browser,
            *FLAGS,
            f"--user-data-dir={tmp / 'profile-dom'}",
            f"--window-size={width},1200",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stdout[:2000]
    found = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert found.get("probed") == "yes", "the page's load event never came"
    return result.stdout, found


def screenshot(browser: str, page: Path, png: Path, size: str = "1000,1200") -> Path:
    subprocess.run(
        [
            browser,
            *FLAGS,
            f"--user-data-dir={png.parent / 'profile-shot'}",
            f"--screenshot={png}",
            f"--window-size={size}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return png


def non_white_share(png: Path) -> float:
    """The share of a PNG's pixels that are not white."""
    import numpy as np
    from PIL import Image  # matplotlib's dependency, so always installed with align

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    return float((pixels.min(axis=2) < 240).mean())
