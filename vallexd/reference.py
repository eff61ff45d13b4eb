"""Alias kept for scripts and docs: `python -m vallexd.reference ...` (see vallexd.tools.conformance)."""

from vallexd.tools.conformance import main

if __name__ == "__main__":
    raise SystemExit(main())
