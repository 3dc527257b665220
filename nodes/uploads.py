"""What a job made, sent home: checkpoints while it runs, its outputs when it ends.

``evo.checkpoint(path)`` and the job's outputs (``evo.artifact(path)``, the spec's
``outputs``) are copied into this machine's cache first (a snapshot: the job may write the
next checkpoint over the file while it travels), hashed on the way, listed in a manifest and
put into the broker's store by a thread beside the node's loop. The job never waits; the
node's report names the manifest's digest once the store has it all (``Checkpointed.digest``,
``JobCompleted.outputs``). A failed upload is a note on the job's stderr, never a failed job.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, NamedTuple

from evo.content import Entry, Manifest, digest_bytes, encode_manifest

from .background import Background, StoreFailed
from .cache import Cache

MAX_FILES = 100_000  # of one checkpoint or output folder


class Upload(NamedTuple):
    job_id: str
    epoch: int  # the lease of the attempt it is of
    kind: str  # "checkpoint" or "output"
    key: str  # the checkpoint's path in its folder, or the output's path
    base: Path  # entries are relative to this
    paths: tuple[str, ...]  # what to send, relative to ``base`` (a file, or a folder)
    extra: Any = None  # the checkpoint's report body, carried back


class Sent(NamedTuple):
    upload: Upload
    digest: str = ""  # the manifest's, "" when it failed
    size: int = 0
    error: str = ""


def snapshot(cache: Cache, base: Path, paths: tuple[str, ...]) -> tuple[Manifest, dict[str, Path]]:
    """The files at ``paths`` under ``base`` (each a file or a folder, links followed), copied
    into the cache: their manifest, and each digest's cached file."""
    entries: list[Entry] = []
    where: dict[str, Path] = {}
    for rel in paths:
        top = base / rel
        if top.is_dir():
            files = sorted(str(Path(d, f).relative_to(base).as_posix())
                           for d, _, fs in os.walk(top) for f in fs)
        elif top.is_file():
            files = [Path(rel).as_posix()]
        else:
            raise FileNotFoundError(f"{top}: no such file or folder")
        if len(files) > MAX_FILES:
            raise OSError(f"{top}: over {MAX_FILES:,} files")
        for name in files:
            digest, size, path = cache.adopt(base / name)
            exe = bool(os.stat(base / name).st_mode & stat.S_IXUSR)
            entries.append(Entry(path=name, digest=digest, size=size, exe=exe))
            where[digest] = path
    return Manifest(files=entries), where


class Uploader(Background):
    name = "evo-upload"

    def __init__(self, cache: Cache, connect: Callable[[], Any]) -> None:
        super().__init__(connect)
        self.cache = cache
        self.pending: dict[str, int] = {}  # job id -> uploads not yet answered

    def send(self, upload: Upload) -> None:
        self.pending[upload.job_id] = self.pending.get(upload.job_id, 0) + 1
        self.put(upload)

    def ready(self) -> list[Sent]:
        done = super().ready()
        for sent in done:
            n = self.pending.get(sent.upload.job_id, 0) - 1
            if n > 0:
                self.pending[sent.upload.job_id] = n
            else:
                self.pending.pop(sent.upload.job_id, None)
        return done

    def _failed(self, upload: Upload, why: str) -> Sent:
        return Sent(upload, error=why)

    def _work(self, upload: Upload) -> Sent:
        try:
            manifest, where = snapshot(self.cache, upload.base, upload.paths)
            raw = encode_manifest(manifest)
            blobs: dict[str, bytes | str] = {d: str(p) for d, p in where.items()}
            digest = digest_bytes(raw)
            blobs[digest] = raw
            self.call("send it to the broker's store", lambda client: client.send_files(blobs))
        except (StoreFailed, OSError, ValueError) as exc:
            return Sent(upload, error=str(exc))
        finally:
            try:
                self.cache.evict()  # checkpoints made here count against the bound too
            except OSError:
                pass
        return Sent(upload, digest=digest, size=sum(e.size for e in manifest.files))


def output_uploads(job_id: str, epoch: int, workdir: Path, declared: list[str],
                   patterns: list[str]) -> tuple[list[Upload], list[str]]:
    """What of a completed job comes home: what it named with ``evo.artifact`` and what its
    spec's ``outputs`` globs match in its folder; and notes on what is not there. An output
    in its folder is named by its path there (and lands at that path under ``evo pull``'s
    folder); one elsewhere by its absolute path (and lands under its file name)."""
    found: dict[str, Path] = {}
    notes: list[str] = []
    root = workdir.resolve()
    for given in declared:
        path = Path(given)
        if not path.exists():
            notes.append(f"output {given} is not there: not sent home")
            continue
        found[given] = path
    for pattern in patterns:
        matched = [m for m in sorted(workdir.glob(pattern)) if m.resolve().is_relative_to(root)]
        if not matched:
            notes.append(f"outputs: {pattern!r} matches nothing in {workdir}")
        for m in matched:
            found[str(m.absolute())] = m
    uploads = []
    for given, path in found.items():
        absolute = path.absolute()
        try:
            rel = absolute.relative_to(workdir.absolute()).as_posix()
            uploads.append(Upload(job_id, epoch, "output", rel, workdir.absolute(), (rel,)))
        except ValueError:
            uploads.append(Upload(job_id, epoch, "output", str(absolute), absolute.parent,
                                  (absolute.name,)))
    return uploads, notes
