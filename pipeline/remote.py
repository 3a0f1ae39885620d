"""Shard folders at URLs. A shard folder is a local path, or a URL of one of REMOTE_PROTOCOLS (`file://`, `s3://`
with s3fs installed, `gs://`, `https://`, `hf://`, ...). URLs are read-only: each shard is downloaded once per node
into the shard cache (pipeline/cache.py), ahead of need, never more than the manifest's size for it, checked against
the manifest's sha256, and then read as a local shard is. Every read goes through pipeline/objstore.py (a lost
connection or a 5xx is retried with back-off). `pipe:` commands are refused: the loader reads samples by index, not as
a stream. Credentials in a URL (`s3://KEY:SECRET@bucket/...`) are refused: they come from the environment only, so no
message, manifest, config or checkpoint carries them. On resume, a URL that only the checkpoint's config names is
refused (`unconfirmed_remote`).
"""

from __future__ import annotations

from ditpipe.pipeline import shards
from ditpipe.pipeline.errors import ShardError
from ditpipe.pipeline.manifest import parse_manifest


def is_url(location) -> bool:
    """A shard location that is not a local path: `scheme://...` (fsspec) or a `pipe:` command."""
    text = str(location)
    return "://" in text or text.startswith("pipe:")


def url_join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def refuse_pipe(location) -> None:
    if str(location).startswith("pipe:"):
        raise ShardError(f"'{location}': pipe: shard locations are not supported (the loader reads samples by index, "
                         "not as a stream, and a pipe: location would run a shell command); copy the shards to a "
                         "local or shared folder, or give an fsspec URL (s3://..., gs://..., file://...)")


# The fsspec protocols a shard location may name: local files, object stores, HTTP(S), the Hugging Face hub, and
# fsspec's in-process `memory` filesystem. Anything else (ssh, ftp, smb, git, chained `a::b` URLs, ...) is refused:
# a location is data, and other protocols reach hosts and credentials nobody meant to hand a shard folder.
REMOTE_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "hf", "memory")
MAX_META_BYTES = shards.MAX_META_BYTES  # a manifest or sidecar, local or read from a URL
REMOTE_KEYS = ("shards.path", "validation.shards")  # config keys that name shard locations


def redacted(location) -> str:
    """`location` for a message: any user information of a URL (`KEY:SECRET@`) replaced by `<credentials>@`."""
    text = str(location)
    if "://" not in text:
        return text
    scheme, rest = text.split("://", 1)
    host, sep, path = rest.partition("/")
    return f"{scheme}://<credentials>@{host.rsplit('@', 1)[1]}{sep}{path}" if "@" in host else text


def check_location(location) -> None:
    """Refuse a `pipe:` command, any URL whose protocol is not in REMOTE_PROTOCOLS and any URL with credentials
    (user information before the host); local paths pass. Messages never repeat the credentials."""
    refuse_pipe(location)
    text = str(location)
    if not is_url(text):
        return
    protocol = text.split("://", 1)[0].lower()
    if "::" in text or protocol not in REMOTE_PROTOCOLS:
        raise ShardError(f"'{redacted(text)}': shard locations may use only the protocols "
                         f"{', '.join(REMOTE_PROTOCOLS)} (no chained '::' URLs); copy the shards to one of those, or "
                         "to a local folder")
    if redacted(text) != text:
        raise ShardError(f"'{redacted(text)}' has credentials in the URL, refused (they would reach configs, "
                         "checkpoints and logs): take them out and give them through the environment instead "
                         "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")


READ_CHUNK = 1 << 20  # one read of a remote object: the most held beyond the cap while it is read
# Protocols whose fsspec file would fetch each block with one range request and keep the whole reply, whatever its
# length (fsspec's HTTPFile: `await r.read()` on a 206): opened as their streaming file (block_size=0) instead, whose
# read(n) returns at most n bytes, so an endless body is refused at the cap instead of read whole.
_STREAMED = ("http", "https", "hf")


def streamed(url: str) -> bool:
    """Whether `url` is opened as its protocol's streaming file (block_size=0; see _STREAMED)."""
    return url.split("://", 1)[0].lower() in _STREAMED


def read_url(url: str, limit: int) -> bytes:
    """The object at an fsspec URL (read-only; never a `pipe:` command), at most `limit` bytes, read in chunks of at
    most READ_CHUNK: one byte past `limit`, or a read that returns more than it asked for, and it is refused, so an
    object larger than it should be (or an endless HTTP body) is never held in memory whole. Through
    `objstore.retrying`: a lost connection or a 5xx is tried again; a missing object is one line naming it."""
    check_location(url)
    from ditpipe.pipeline import objstore

    return objstore.retrying(f"reading '{url}'", lambda: _read_once(url, limit))


def _read_once(url: str, limit: int) -> bytes:
    from ditpipe.pipeline import objstore

    fs, path = objstore.filesystem(url)
    try:
        with fs.open(path, "rb", **({"block_size": 0} if streamed(url) else {})) as f:
            parts, held = [], 0
            while held <= limit:
                want = min(READ_CHUNK, limit + 1 - held)
                part = f.read(want)
                if len(part) > want:
                    raise ShardError(f"'{url}': a read of {want:,} bytes returned {len(part):,}, more than asked; the "
                                     "remote location does not answer range reads as asked (refused: it could send "
                                     "without end)")
                if not part:
                    break
                parts.append(part)
                held += len(part)
            data = b"".join(parts)
    except FileNotFoundError:
        raise ShardError(f"{url} is missing at the remote location; upload it (a shard folder whole, manifest last) "
                         "or name the right location") from None
    except ValueError as e:
        raise ShardError(f"cannot read '{url}': {e}") from None
    if len(data) > limit:
        raise ShardError(f"'{url}' is larger than the {limit:,} bytes expected (the manifest's size for a shard); it "
                         "was changed at the remote location or is not ours; re-upload the shard folder")
    return data


def unconfirmed_remote(saved: dict, given: dict) -> list[tuple[str, str]]:
    """(key, message) for every shard location that a checkpoint's saved config (`saved`, the YAML tree) makes a
    URL while the command line (`given`, dotted overrides) does not name it again: on resume a checkpoint found on
    disk must not choose where data is fetched from."""
    problems = []
    for key in REMOTE_KEYS:
        section, name = key.split(".")
        value = (saved.get(section) or {}).get(name)
        if value is not None and is_url(value) and given.get(key) != value:
            problems.append((key, f"the checkpoint's config reads shards from the remote location '{value}'; a "
                                  f"config found on disk does not choose remote locations: name it on the command "
                                  f"line to confirm (--{key} {value})"))
    return problems


def load_url_manifest(url: str) -> dict:
    """`manifest.load_manifest` for an fsspec URL folder."""
    where = url_join(url, shards.MANIFEST)
    try:
        raw = read_url(where, MAX_META_BYTES)
    except ShardError as e:
        raise ShardError(f"no readable {shards.MANIFEST} at '{url}' ({e}); the URL must name a finished ditpipe "
                         "shard folder, uploaded whole") from None
    return parse_manifest(raw, where, remote=True)  # refused as from a path, in the same words
