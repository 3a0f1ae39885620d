"""The shard formats, one module each, found through one registry keyed by the manifest's `format` string.

A format module (the shape of mosaicml/streaming's per-format reader and writer) holds everything that depends on
how a shard's bytes are laid out:

    NAME, PREFIX, SUFFIX     the manifest's format string and its shard files' names (`<PREFIX>-00000<SUFFIX>`)
    NAME_RE, NAME_HINT       the names a manifest may give its shards (fullmatch), and how to say it in a message
    Writer                   writes one shard's bytes; its `sidecar()` / `text_sidecar()` add the reader's index
    Reader                   random access by row: `gather` copies chosen slices of many rows with array indexing
    iter_shard               the fast sequential read of a whole shard (pipeline/shards.py's Samples)
    decode                   `ditpipe verify`'s independent decode of a shard, appending problems

Everything else (atomic writing, sidecars, the manifest, checks against it, the loader's order) is shared and never
asks which format it holds. A new format is one new module here and one line in FORMATS.
"""

from __future__ import annotations

import re
from types import ModuleType

from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.formats import parquet, wds

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (wds, parquet)}


def names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get(name: str) -> ModuleType:
    """The module of the format a manifest names."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ShardError(f"unknown shard format {name!r}; this ditpipe reads {', '.join(FORMATS)}") from None


# Shard file names of any format (5 digits, as `shard_name` writes below shard 100,000), e.g. for verify's listing.
SHARD_FILE_RE = re.compile("^(" + "|".join(rf"{re.escape(m.PREFIX)}-\d{{5}}{re.escape(m.SUFFIX)}"
                                           for m in FORMATS.values()) + ")$")
# A shard file, its sidecar or its stat cache: group 1 is the shard's index.
OURS_RE = re.compile("^(?:" + "|".join(re.escape(m.PREFIX) for m in FORMATS.values()) + r")-(\d{5})\.(?:"
                     + "|".join(re.escape(m.SUFFIX[1:]) for m in FORMATS.values()) + r"|meta\.json|stat\.json)$")
