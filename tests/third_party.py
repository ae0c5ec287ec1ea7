"""Make the worked example package (tests/example_plugin) discoverable as an installed
distribution, through a fake dist-info, without installing anything."""
from __future__ import annotations

from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent / "example_plugin"
DIST, VERSION = "wsss-bench-example", "0.3.0"


def fake_site(root: Path) -> Path:
    """A folder with a dist-info for the example; put it and EXAMPLE on sys.path."""
    info = root / f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text("[wsss_bench]\nwsss_bench_example = wsss_bench_example\n")
    return root
