"""The preset catalogue: public voice presets that `preset install NAME` can fetch.

The one file is `presets/catalogue.toml` in the source tree.  An installed
package carries it as a data file (`[tool.setuptools.data-files]` puts it in
`<prefix>/share/vallexd/`), so there is exactly one copy in git.
`$VALLEXCTL_CATALOGUE` (or `--catalogue`) points at another file, e.g. a
mirror's or a test's.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexd.constants import LANGUAGES
from vallexd.errors import InvalidArgument, NotFound

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_VAR = "VALLEXCTL_CATALOGUE"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    language: str
    description: str
    url: str
    sha256: str
    size: int | None = None
    group: str = ""
    frames: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "language": self.language, "group": self.group,
            "description": self.description, "url": self.url, "sha256": self.sha256,
            "size": self.size, "frames": self.frames,
        }


def candidate_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the catalogue may be, in order: env override, source checkout, installed data file."""
    env = os.environ if environ is None else environ
    paths: list[Path] = []
    if env.get(ENV_VAR):
        return [Path(env[ENV_VAR]).expanduser()]
    paths.append(Path(__file__).resolve().parent.parent / "presets" / "catalogue.toml")
    for prefix in (sysconfig.get_paths()["data"], sys.prefix, sys.base_prefix):
        paths.append(Path(prefix) / "share" / "vallexd" / "catalogue.toml")
    return paths


def find_catalogue(environ: Mapping[str, str] | None = None) -> Path:
    for path in candidate_paths(environ):
        if path.is_file():
            return path
    raise NotFound(
        "the preset catalogue (catalogue.toml) was not found; looked in "
        + ", ".join(str(p) for p in candidate_paths(environ))
        + f" (set {ENV_VAR} to its path)",
        reason="NO_CATALOGUE",
    )


def load_catalogue(path: Path | None = None) -> list[CatalogueEntry]:
    path = path or find_catalogue()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NotFound(f"cannot read the preset catalogue {path}: {exc.strerror or exc}",
                       reason="NO_CATALOGUE") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"the preset catalogue {path} is not valid TOML: {exc}",
                              reason="BAD_CATALOGUE") from None
    entries = [_entry(item, path, i) for i, item in enumerate(data.get("preset", []))]
    seen: set[str] = set()
    for entry in entries:
        if entry.name.casefold() in seen:
            raise InvalidArgument(f"{path}: preset {entry.name!r} is listed twice", reason="BAD_CATALOGUE")
        seen.add(entry.name.casefold())
    return entries


def lookup(name: str, entries: list[CatalogueEntry]) -> CatalogueEntry | None:
    """Exact name first, then case-insensitive (people type `yshtola`-style variants)."""
    for entry in entries:
        if entry.name == name:
            return entry
    folded = name.casefold()
    for entry in entries:
        if entry.name.casefold() == folded:
            return entry
    return None


def _entry(item: Any, path: Path, index: int) -> CatalogueEntry:
    where = f"{path}: preset #{index + 1}"
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where} is not a table", reason="BAD_CATALOGUE")

    def text(key: str) -> str:
        value = item.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{where}: '{key}' must be a non-empty string", reason="BAD_CATALOGUE")
        return value

    entry = CatalogueEntry(
        name=text("name"), language=text("language"), description=text("description"),
        url=text("url"), sha256=text("sha256").lower(),
        size=item.get("size") if isinstance(item.get("size"), int) else None,
        group=str(item.get("group", "")),
        frames=item.get("frames") if isinstance(item.get("frames"), int) else None,
    )
    if entry.language not in LANGUAGES:
        raise InvalidArgument(f"{where}: unknown language {entry.language!r}", reason="BAD_CATALOGUE")
    if not _SHA256_RE.match(entry.sha256):
        raise InvalidArgument(f"{where}: sha256 must be 64 hex digits", reason="BAD_CATALOGUE")
    if not entry.url.startswith(("http://", "https://")):
        raise InvalidArgument(f"{where}: url must be http(s)", reason="BAD_CATALOGUE")
    return entry
