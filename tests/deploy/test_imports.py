"""Every module of the bridge imports on its own, whatever was imported before it.

A cycle between packages shows only when a module of it is the first one imported: the
suite, importing them in its own order, passed while ``import bridge.sources.segment.spec``
failed alone (spec -> mapping.shapes -> the mapping package -> compiler -> spec)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# In a child: each module imported with no module of the bridge loaded before it.
SCRIPT = """
import importlib, pkgutil, sys
import bridge
names = sorted(m.name for m in pkgutil.walk_packages(bridge.__path__, "bridge."))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "bridge" or m.startswith("bridge.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_module_imports_on_its_own() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, *failed = done.stdout.strip().splitlines()
    assert int(count) > 80  # the walk found the package's modules
    assert failed == [], "\n".join(failed)
