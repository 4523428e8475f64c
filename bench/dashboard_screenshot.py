"""Take docs/dashboard.png: the dashboard of a real server with a batch in flight.

    python bench/dashboard_screenshot.py [--out docs/dashboard.png] [--history 300]

Sets up the browser test's scene (tests/server/http/test_dashboard_browser.py: two
real sandboxed agents, one of them with a hostile name, a batch with work done, a
failure, jobs running and queued), after ``--history`` quick jobs so the jobs/s graph
has a shape, and has Debian's headless chromium screenshot the page.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` and `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server.http.test_dashboard_browser import CHROMIUM, chromium, dashboard_scene

REPO = Path(__file__).resolve().parent.parent


async def take(out: Path, history: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vcomp-dashboard-") as tmp:
        root = Path(tmp)
        async with dashboard_scene(root, history=history) as scene:
            await chromium(
                root,
                scene.url,
                f"--screenshot={out.resolve()}",
                "--window-size=1280,760",
                "--hide-scrollbars",
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--history", type=int, default=300, help="quick jobs run first (300)")
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(take(args.out, args.history))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
