"""A time-zone name as a config value, shared by the sections that compute calendar dates ([usage], [console]).

Checked against the IANA database when the config loads, so a typo fails `xcstack serve` at start with the
config error format instead of on the first quota period or page that needs the zone.
"""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator


def known_zone(name: str) -> str:
    """`name` when ZoneInfo can load it; else ValueError (what pydantic reports as a validation error).
    OSError too: a folder of the database ("Asia") raises IsADirectoryError on Python 3.11."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
    return name


TimeZoneName = Annotated[str, AfterValidator(known_zone)]
