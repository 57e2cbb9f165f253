"""Pages as a person sees them: Debian's headless Chromium renders the Prefect UI (a JavaScript
app), for its DOM text or a screenshot. ``make test`` installs ``chromium`` (scripts/install_chromium.sh)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

WINDOW = "1400,1500"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no chromium on PATH: `make test` installs it (scripts/install_chromium.sh)")


def _run(url: str, *flags: str, budget_ms: int = 15000) -> subprocess.CompletedProcess:
    # virtual time lets the app fetch from the API and render before the dump or the shot
    return subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", f"--window-size={WINDOW}",
                           f"--virtual-time-budget={budget_ms}", *flags, url],
                          capture_output=True, text=True, timeout=120, check=True)


def page_text(url: str) -> str:
    """The rendered page's visible text, whitespace collapsed."""
    dom = _run(url, "--dump-dom").stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def screenshot(url: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}")
    assert path.stat().st_size > 10_000, f"{path}: screenshot looks empty"
    return path
