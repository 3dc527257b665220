"""What jobs need on this machine, by digest: ``EVO_HOME/cache``, shared by its nodes.

``blobs/`` holds files fetched from the broker's store, each checked against its digest on
arrival. ``trees/`` holds copies of jobs' code (one folder per manifest and inputs), made of
hard links to the blobs. ``inputs/`` names an input's blob by its file name.

Every cached file is read-only and carries a fixed mtime (MARK_NS): a job that writes into its
copy in place changes the mtime (and the size), which the next use sees, so the file is made
again from the store rather than trusted. The cache is bounded by size; what is not in use is
evicted oldest first (trees, then blobs), by the access time set on every use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from evo.content import Entry, Manifest, safe_relative

MARK_NS = 10**18  # 2001-09-09: the mtime of every cached file; a write in place changes it

# (digest, file to write) -> size: writes the blob's bytes, checked against the digest on
# arrival (evo.Client.fetch), or raises
Fetch = Callable[[str, Path], int]


class Cache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.in_use: dict[str, int] = {}  # tree keys and blob digests of running jobs
        self._lock = threading.Lock()  # the loop and the staging and upload threads count it
        self._grown = True  # something was added since the bound was last looked at
        for sub in ("blobs", "trees", "inputs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    @staticmethod
    def intact(path: Path, size: int | None = None, exe: bool = False) -> bool:
        """The cached file is as it arrived (not written since, nor replaced)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_mtime_ns == MARK_NS and (size is None or st.st_size == size)
                and stat.S_ISREG(st.st_mode) and (not exe or bool(st.st_mode & stat.S_IXUSR)))

    def seal(self, path: Path, exe: bool = False) -> None:
        os.chmod(path, 0o555 if exe else 0o444)
        os.utime(path, ns=(time.time_ns(), MARK_NS))

    def _tmp(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    def blob(self, digest: str, fetch: Fetch, size: int | None = None) -> Path:
        """The blob's cached file, fetched (and checked) when it is absent or was changed."""
        path = self.blob_path(digest)
        if self.intact(path, size):
            os.utime(path, ns=(time.time_ns(), MARK_NS))  # its last use, for eviction
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp()
        try:
            fetch(digest, tmp)
            self.seal(tmp)
            os.replace(tmp, path)
            self._grown = True
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def adopt(self, path: Path) -> tuple[str, int, Path]:
        """A copy of the local file ``path`` among the blobs, hashed on the way (a snapshot:
        the file may change once copied): (digest, size, the cached file)."""
        tmp = self._tmp()
        try:
            for _ in range(3):  # a file written while it was copied is copied again
                before = os.stat(path)
                h = hashlib.sha256()
                size = 0
                with open(path, "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
                after = os.stat(path)
                if (before.st_ino, before.st_size, before.st_mtime_ns) == \
                        (after.st_ino, after.st_size, after.st_mtime_ns) == \
                        (after.st_ino, size, after.st_mtime_ns):
                    break
            else:
                raise OSError(f"{path} kept changing while it was copied")
            digest = h.hexdigest()
            blob = self.blob_path(digest)
            if not self.intact(blob, size):
                blob.parent.mkdir(parents=True, exist_ok=True)
                self.seal(tmp)
                os.replace(tmp, blob)
                self._grown = True
            else:
                os.utime(blob, ns=(time.time_ns(), MARK_NS))  # its last use, for eviction
            return digest, size, blob
        finally:
            tmp.unlink(missing_ok=True)

    def _place(self, target: Path, source: Path, exe: bool) -> None:
        """``target`` becomes the cached file ``source`` (a link; a copy for an executable, so
        that the blob's mode stays its own)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp()
        try:
            if exe:
                shutil.copyfile(source, tmp)
                self.seal(tmp, exe=True)
            else:
                try:
                    os.link(source, tmp)
                except OSError:  # another file system: a copy
                    shutil.copyfile(source, tmp)
                    self.seal(tmp)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def tree(self, key: str, manifest: Manifest, extra: dict[str, tuple[str, int]],
             fetch: Fetch) -> Path:
        """The folder of a job's code (and of ``extra``: inputs inside its folder, relative
        path -> (digest, size)), made or mended so that every file is as recorded."""
        d = self.root / "trees" / key
        d.mkdir(parents=True, exist_ok=True)  # a job of no files has a folder all the same
        wanted = list(manifest.files) + [Entry(path=rel, digest=dg, size=size)
                                         for rel, (dg, size) in sorted(extra.items())]
        for e in wanted:
            if not safe_relative(e.path):
                raise ValueError(f"unsafe path {e.path!r} in a manifest")
            target = d / e.path
            if self.intact(target, e.size, e.exe):
                continue
            self._place(target, self.blob(e.digest, fetch, e.size), e.exe)
        os.utime(d)  # its last use, for eviction
        return d

    def named(self, digest: str, name: str, size: int, fetch: Fetch) -> Path:
        """An input's cached file under its own name (``inputs/DIGEST/NAME``)."""
        base = Path(name).name
        target = self.root / "inputs" / digest / (base if base not in ("", ".", "..") else "input")
        if not self.intact(target, size):
            self._place(target, self.blob(digest, fetch, size), exe=False)
        os.utime(target.parent)
        return target

    # --- bounded by size ----------------------------------------------------------------------

    def hold(self, key: str) -> None:
        with self._lock:
            self.in_use[key] = self.in_use.get(key, 0) + 1

    def release(self, key: str) -> None:
        with self._lock:
            n = self.in_use.get(key, 0) - 1
            if n > 0:
                self.in_use[key] = n
            else:
                self.in_use.pop(key, None)

    def usage(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root / "blobs"):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
        return total

    def evict(self) -> list[str]:
        """Remove what no running job uses, oldest use first, until the cache fits its bound
        (trees and named inputs first: their files are links to blobs); what was removed."""
        with self._lock:
            if not self._grown:  # a job staged from what is here: nothing to look at
                return []
            self._grown = False
            return self._evict()

    def _evict(self) -> list[str]:
        gone: list[str] = []
        total = self.usage()
        if total <= self.max_bytes:
            return gone
        # the copies go first, all that are not in use (links: remade from blobs at once)
        folders = [p for sub in ("trees", "inputs") for p in (self.root / sub).iterdir()]
        for p in sorted(folders, key=_mtime):
            if p.name in self.in_use:
                continue
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
        blobs = [p for sub in (self.root / "blobs").iterdir() for p in sub.iterdir()]
        for p in sorted(blobs, key=_atime):
            if total <= self.max_bytes:
                break
            if p.name in self.in_use:
                continue
            try:
                size = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            total -= size
            gone.append(p.name)
        return gone


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _atime(p: Path) -> int:
    try:
        return p.stat().st_atime_ns
    except OSError:
        return 0
