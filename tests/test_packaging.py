"""What `pip install .` (not -e) puts on a server: a wheel built from the tracked files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gateway.admin import UI_DIR

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_dashboard_and_the_command(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():  # a file deleted but not yet committed is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-q", "--disable-pip-version-check", "-w", str(tmp_path / "dist"), source],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("busgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    served = {f"gateway/ui/{path.name}" for path in UI_DIR.iterdir() if path.is_file()}
    assert "gateway/ui/index.html" in served
    assert served <= names, sorted(served - names)
    assert {"gateway/cli.py", "fastcgi/pool.py", "adapters/storage/sqlite.py"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "busgate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
