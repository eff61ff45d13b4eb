"""Alias kept for scripts and docs: `python -m vallexd.devtools make-tiny DIR` (tools/tiny_weights.py)."""

from vallexd.tools.tiny_weights import main

if __name__ == "__main__":
    raise SystemExit(main())
