"""The broker's content store: files by sha256 under ``EVO_HOME/store``.

Code, inputs (and later checkpoints and outputs) are kept here once per content; events carry
only digests. An upload arrives in chunks at increasing offsets (a chunk at another offset is
not written, and the reply says where to resume, as for output); the last chunk is checked
against the digest it was sent for, synced, and only then renamed into place, so a blob that
is in the store is whole and right. A job is accepted only once everything it names is here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from evo.content import decode_manifest, is_digest

from .protocol import BLOB_CHUNK as CHUNK


class StoreError(ValueError):
    pass


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._partial: dict[str, tuple[int, hashlib._Hash]] = {}  # digest -> (size, hash so far)
        self._whole_trees: set[str] = set()  # manifests whose every file is here

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise StoreError(f"{digest!r} is not a sha256 digest")
        return self.root / "sha256" / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def missing(self, digests: list[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def put(self, digest: str, size: int, offset: int, data: bytes) -> int:
        """Append a chunk of the blob ``digest`` (``size`` bytes in all); the bytes received so
        far (``size`` once it is stored). StoreError when the whole does not hash to
        ``digest`` (nothing is kept)."""
        final = self.path(digest)
        if final.is_file():
            return size
        part = self.root / "partial" / digest
        have = self._partial.get(digest)
        if have is None:
            have = self._resume(part)
        got, h = have
        if got < size:  # (all of it arrived before a restart: it is finished below)
            if offset != got or got + len(data) > size:
                return got
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab") as f:
                try:
                    f.write(data)
                    f.flush()
                    if got + len(data) == size:
                        os.fsync(f.fileno())
                except OSError:
                    f.truncate(got)  # a full disk: what was taken stays, nothing half-written
                    self._partial.pop(digest, None)
                    raise
            got += len(data)
            h.update(data)
        if got < size:
            self._partial[digest] = (got, h)
            return got
        self._partial.pop(digest, None)
        if not part.exists():  # an empty file: nothing was written
            part.parent.mkdir(parents=True, exist_ok=True)
            part.touch()
        if h.hexdigest() != digest:
            part.unlink(missing_ok=True)
            raise StoreError(f"the {size:,} bytes sent for {digest[:12]} hash to "
                             f"{h.hexdigest()[:12]}: the file changed while it was sent")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    def _resume(self, part: Path) -> tuple[int, hashlib._Hash]:
        """What an earlier broker had received of a partial upload (after a restart)."""
        h = hashlib.sha256()
        got = 0
        try:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    got += len(chunk)
        except FileNotFoundError:
            pass
        return got, h

    def read(self, digest: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of a stored blob from ``offset``, and its size."""
        try:
            with open(self.path(digest), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(max(0, min(limit, CHUNK))), size
        except FileNotFoundError:
            raise StoreError(f"no blob {digest[:12]} in the broker's store") from None

    def absent(self, tree: str, inputs: dict[str, str]) -> str:
        """Why a job naming the code ``tree`` and ``inputs`` (path -> digest) cannot be
        accepted yet ("" when everything is stored)."""
        for path, digest in inputs.items():
            if os.path.isabs(path) and not is_digest(digest):
                return f"input {path}: {digest[:80]!r} is not a sha256 digest"
            if os.path.isabs(path) and not self.has(digest):
                return f"input {path} ({digest[:12]}) is not in the broker's store"
        if not tree or tree in self._whole_trees:
            return ""
        if not is_digest(tree):
            return f"code tree {tree[:80]!r} is not a sha256 digest"
        if not self.has(tree):
            return f"code tree {tree[:12]} is not in the broker's store"
        try:
            manifest = decode_manifest(self.path(tree).read_bytes())
        except (ValueError, OSError) as exc:
            return f"code tree {tree[:12]} is not a manifest: {exc}"
        lost = self.missing([e.digest for e in manifest.files])
        if lost:
            name = next(e.path for e in manifest.files if e.digest == lost[0])
            return (f"code tree {tree[:12]}: {len(lost)} file(s) are not in the broker's store "
                    f"(the first: {name})")
        self._whole_trees.add(tree)
        return ""
