"""Write screenshots/NN-<screen>.svg for every wizard screen, from the same fixed data as the snapshot tests.

Usage: python scripts/make_screenshots.py [--size 100x30] [--out screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from elite_tui.showcase import SHOWCASE_SCREENS, showcase_app


async def screenshot(screen: str, variant: str, workdir: Path, size: tuple[int, int]) -> str:
    app = showcase_app(screen, workdir, variant)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause(0.2)
        return app.export_screenshot(title=f"elite-tui: {screen}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100x30", help="terminal WIDTHxHEIGHT (default 100x30)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "screenshots")
    args = parser.parse_args(argv)
    width, height = (int(part) for part in args.size.lower().split("x"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="elite-screens-") as scratch:
        # Showcase paths are relative, so the screenshots show "runs/run-1", not a temp path.
        os.chdir(scratch)
        os.environ["ELITE_TUI_CACHE_DIR"] = str(Path(scratch) / "cache")
        try:
            for filename, screen, variant in SHOWCASE_SCREENS:
                workdir = Path(scratch) / filename
                workdir.mkdir()
                os.chdir(workdir)
                svg = asyncio.run(screenshot(screen, variant, workdir, (width, height)))
                path = out / f"{filename}.svg"
                path.write_text(svg, encoding="utf-8")
                print(path)
        finally:
            os.chdir(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
