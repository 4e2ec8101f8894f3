"""Run the ``bridge`` command with interpreter-level tweaks, to try a tuning idea on the
real bridge without editing it:

    python -m bench.variant SPEC serve --config FILE

SPEC is a comma-separated list (``-`` for none):

- ``switch=S``     ``sys.setswitchinterval(S)``: how long a thread may hold the GIL while
                   another waits (default 0.005 s). The store's writer thread shares the
                   server core with the event loop.
- ``gc=A/B/C``     ``gc.set_threshold(A, B, C)``: fewer, larger young collections.
- ``gc_freeze``    ``gc.freeze()`` after imports, so the collector skips start-up objects.
"""

from __future__ import annotations

import gc
import sys


class VariantError(ValueError):
    pass


def apply(spec: str, *, dry_run: bool = False) -> list[str]:
    """Apply ``spec`` (or only check it, with ``dry_run``); returns the items, for the log."""
    applied: list[str] = []
    if spec in ("", "-"):
        return applied
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        try:
            if name == "switch":
                interval = float(value)
                if not dry_run:
                    sys.setswitchinterval(interval)
            elif name == "gc":
                a, b, c = (int(x) for x in value.split("/"))
                if not dry_run:
                    gc.set_threshold(a, b, c)
            elif name == "gc_freeze" and not value:
                if not dry_run:
                    gc.collect()
                    gc.freeze()
            else:
                raise VariantError(f"unknown variant item {item!r}; expected switch=S, gc=A/B/C or gc_freeze")
        except ValueError as exc:
            if isinstance(exc, VariantError):
                raise
            raise VariantError(f"bad value in variant item {item!r}: {exc}") from None
        applied.append(item.strip())
    return applied


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m bench.variant SPEC <bridge arguments>\n")
        return 2
    # Import the bridge first so gc_freeze covers its modules.
    from bridge.app import serve  # noqa: F401
    from bridge.cli import main as bridge_main

    try:
        applied = apply(args[0])
    except VariantError as exc:
        sys.stderr.write(f"bench.variant: {exc}\n")
        return 2
    sys.stderr.write(f"bench.variant: {', '.join(applied) or 'none'}\n")
    result: int = bridge_main(args[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
