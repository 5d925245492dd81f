"""Converted copies of GGUF sources, so a GGUF is dequantized and its tokenizer built once.

An entry is a folder under ``<cache dir>/converted/`` holding what ``load_model`` needs
to skip the GGUF: the weights as safetensors in the scoring dtype, the corrected tokenizer
files, the model and generation configs, the source config ``resolve_source`` reads, and
``manifest.json``. The entry name hashes the GGUF's resolved path, size, modification
time and inode plus the dtype; the manifest repeats them, with each file's size and CRC-32.

Entries are written into a temporary folder and renamed into place, so a reader sees a
whole entry or none. An entry that fails any check (missing or truncated file, bad
safetensors header, checksum, or a manifest that names another file or dtype) is deleted
and rebuilt, never used. The folder is capped (``SHORTGPT_EXPORT_CACHE_SIZE``, default
8G; 0 turns the cache off): after each write the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import default_model
from .code_identity import code_identity
from .errors import CorruptModelError, ShortGPTError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCE_CONFIG = "source-config"  # subfolder: the config resolve_source reads from the GGUF
LAST_USED = ".last-used"
DEFAULT_LIMIT = 8 * 1024**3
STALE_TEMP_S = 3600
CRC_CHUNK = 16 * 1024 * 1024
UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class CacheEntryError(Exception):
    """An entry that must not be used; the message says why."""


def cache_root() -> Path:
    """``<cache dir>/converted`` (see ``default_model.cache_dir``)."""
    return default_model.cache_dir() / "converted"


def size_limit() -> int:
    """The cap in bytes from ``SHORTGPT_EXPORT_CACHE_SIZE`` ("8G", "500M", "0" = off)."""
    text = os.environ.get("SHORTGPT_EXPORT_CACHE_SIZE", "").strip().lower()
    if not text:
        return DEFAULT_LIMIT
    number, unit = text.rstrip("ib"), ""
    if number and number[-1] in UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number)
    except ValueError:
        raise ShortGPTError(
            f"SHORTGPT_EXPORT_CACHE_SIZE={text!r} is not a size",
            hint="use a number of bytes or one like 500M or 8G (0 turns the cache off)",
        ) from None
    return int(value * UNITS[unit])


def gguf_identity(path: Path) -> dict:
    """What keys an entry: the GGUF's resolved path, size, mtime and inode."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
    }


def _source_key(identity: dict) -> str:
    text = json.dumps([FORMAT_VERSION, identity], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def entry_path(gguf: Path, dtype: str) -> Path:
    """Where the entry of ``gguf`` in ``dtype`` (``"float32"``...) lives."""
    return cache_root() / f"{_source_key(gguf_identity(gguf))}-{dtype}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(CRC_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _read_manifest(entry: Path) -> dict:
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheEntryError(f"unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CacheEntryError("manifest is not an object with a file list")
    return manifest


def check_entry(entry: Path, gguf: Path, dtype: str, *, checksums: bool = True) -> dict:
    """The entry's manifest if every file is whole and it belongs to ``gguf`` in ``dtype``.

    Raises ``CacheEntryError`` naming the first problem: a manifest for another GGUF (or
    an older version of it), dtype, or converter (another version of this package, torch,
    transformers or gguf: code_identity), a missing or resized file, a safetensors header
    that does not tile its file, or (with ``checksums``) a CRC-32 mismatch.
    """
    from .safetensors_io import read_header

    manifest = _read_manifest(entry)
    expected = {
        "version": FORMAT_VERSION,
        "converter": code_identity(),
        "gguf": gguf_identity(gguf),
        "dtype": dtype,
    }
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise CacheEntryError(f"manifest {key} is {manifest.get(key)!r}, expected {value!r}")
    for name, info in manifest["files"].items():
        file = entry / name
        if not isinstance(info, dict) or not file.is_file():
            raise CacheEntryError(f"{name} is missing")
        if file.stat().st_size != info.get("size"):
            raise CacheEntryError(
                f"{name} has {file.stat().st_size} bytes, the manifest says {info.get('size')}"
            )
        if name.endswith(".safetensors"):
            try:
                read_header(file)
            except CorruptModelError as exc:
                raise CacheEntryError(exc.message) from None
        if checksums and _crc32(file) != info.get("crc32"):
            raise CacheEntryError(f"{name} does not match its checksum")
    if not any(name.endswith(".safetensors") for name in manifest["files"]):
        raise CacheEntryError("the manifest lists no weights")
    return manifest


def discard(entry: Path, why: str) -> None:
    log.warning("cache entry %s is not usable (%s); rebuilding it", entry.name, why)
    shutil.rmtree(entry, ignore_errors=True)


def _touch(entry: Path) -> None:
    stamp = entry / LAST_USED
    try:
        stamp.touch()
        os.utime(stamp)
    except OSError:
        pass


def cached_source_config(gguf: Path):
    """The source config stored with any entry of ``gguf``, or None (no entry matches)."""
    if size_limit() <= 0:
        return None
    root = cache_root()
    try:
        identity = gguf_identity(gguf)
        candidates = sorted(root.glob(f"{_source_key(identity)}-*"))
    except OSError:
        return None
    converter = code_identity()
    for entry in candidates:
        folder = entry / SOURCE_CONFIG
        try:
            manifest = _read_manifest(entry)
            if (
                manifest.get("gguf") != identity
                or manifest.get("converter") != converter
                or not folder.is_dir()
            ):
                continue
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(folder)
        except Exception as exc:  # a damaged entry is skipped here, rebuilt on load
            log.info("cache entry %s has no usable source config (%s)", entry.name, exc)
    return None


def find_entry(gguf: Path, dtype: str) -> Path | None:
    """A checked entry for ``gguf`` in ``dtype`` (its use stamped), or None.

    A damaged entry is deleted (and logged) so the caller rebuilds it.
    """
    if size_limit() <= 0:
        return None
    entry = entry_path(gguf, dtype)
    if not entry.is_dir():
        return None
    try:
        check_entry(entry, gguf, dtype)
    except CacheEntryError as exc:
        discard(entry, str(exc))
        return None
    _touch(entry)
    return entry


def store_entry(gguf: Path, dtype: str, model, tokenizer, source_config) -> Path | None:
    """Write the converted copy of ``gguf`` atomically; None when it does not fit the cap."""
    limit = size_limit()
    if limit <= 0:
        return None
    entry = entry_path(gguf, dtype)
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    temp = root / f".tmp-{entry.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        temp.mkdir()
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        source_config.save_pretrained(temp / SOURCE_CONFIG)
        files = {}
        for file in sorted(p for p in temp.rglob("*") if p.is_file()):
            name = file.relative_to(temp).as_posix()
            files[name] = {"size": file.stat().st_size, "crc32": _crc32(file)}
        total = sum(info["size"] for info in files.values())
        if total > limit:
            log.info("not caching %s: %d bytes exceed the %d-byte cap", gguf.name, total, limit)
            return None
        manifest = {
            "version": FORMAT_VERSION,
            "converter": code_identity(),
            "gguf": gguf_identity(gguf),
            "dtype": dtype,
            "files": files,
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        (temp / LAST_USED).touch()
        if entry.exists():  # another process won the race, or a damaged entry is left
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(temp, entry)
    except OSError as exc:  # a full or read-only disk costs speed, never the run
        log.warning("could not write the load cache entry for %s: %s", gguf.name, exc)
        return None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("cached the converted %s in %s", gguf.name, entry)
    evict(limit, keep=entry)
    return entry


def _remove_stale_temps(root: Path) -> None:
    now = time.time()
    for temp in root.glob(".tmp-*"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            pass


@dataclass
class EntryInfo:
    name: str
    source: str  # the GGUF it was converted from
    dtype: str
    size: int  # bytes
    last_used: float  # seconds since the epoch


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_entries() -> list[EntryInfo]:
    """Every entry, most recently used first (damaged ones included, source unknown)."""
    root = cache_root()
    if not root.is_dir():
        return []
    entries = []
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            manifest = _read_manifest(entry)
            source = str(manifest.get("gguf", {}).get("path", "?"))
            dtype = str(manifest.get("dtype", "?"))
        except CacheEntryError:
            source, dtype = "? (damaged)", "?"
        stamp = entry / LAST_USED
        used = stamp.stat().st_mtime if stamp.exists() else entry.stat().st_mtime
        entries.append(EntryInfo(entry.name, source, dtype, _folder_size(entry), used))
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def evict(limit: int, keep: Path | None = None) -> list[str]:
    """Delete least recently used entries until the total fits ``limit``; their names."""
    entries = list_entries()
    total = sum(e.size for e in entries)
    removed = []
    for entry in reversed(entries):  # oldest first
        if total <= limit:
            break
        if keep is not None and entry.name == keep.name:
            continue
        shutil.rmtree(cache_root() / entry.name, ignore_errors=True)
        total -= entry.size
        removed.append(entry.name)
        log.info("evicted cache entry %s (%s)", entry.name, entry.source)
    return removed


def clear() -> tuple[int, int]:
    """Delete every entry and temporary folder; (entries removed, bytes freed)."""
    root = cache_root()
    if not root.is_dir():
        return 0, 0
    count = freed = 0
    for entry in root.iterdir():
        if entry.is_dir():
            freed += _folder_size(entry)
            count += not entry.name.startswith(".")
            shutil.rmtree(entry, ignore_errors=True)
    return count, freed
