"""Screenshot a run's report.html in Chromium at a given width (the figure in docs/figures).

    python docs/screenshot.py RUN_DIR docs/figures/report_1400.jpg [--width 1400]

Needs Playwright and a Chromium (Debian's ``chromium`` is used when installed).
"""

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto((args.run_dir / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(args.out), full_page=True, type="jpeg", quality=70)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
