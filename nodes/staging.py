"""Before a job starts: its files, as recorded at submit, on this machine.

A job whose spec names a code tree or input files (``JobSpec.tree``, absolute paths in
``JobSpec.data``) is staged first, in a thread of its own so that the node's loop (heartbeats,
other jobs) never waits for a fetch:

* when the job's original folder is on this machine and every file in it still has its
  recorded digest (and so has every input at its path), it runs there and nothing is copied;
* otherwise it runs in a copy made from the cache (``nodes/cache.py``), whatever is missing
  fetched from the broker's store and checked against its digest. Inputs inside the job's
  folder are placed at their relative paths in the copy; inputs elsewhere are given under
  their own file names, and the job is told where (``Placement.paths``).

Either way a job never runs against a file whose digest differs from the recorded one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from evo.broker.protocol import LeaseGrant
from evo.content import HashCache, Manifest, decode_manifest, digest_bytes
from evo.events.schema import JobSpec

from .background import Background, StoreFailed
from .cache import Cache, Fetch

log = logging.getLogger("evo.node")


class Placement(NamedTuple):
    workdir: str = ""  # where the job runs ("": as the spec says)
    paths: dict[str, str] = {}  # an input's recorded path -> where it is here (if elsewhere)
    how: str = ""  # lines for the job's stderr: where its files came from
    error: str = ""  # it cannot run: why
    retryable: bool = True
    cancelled: bool = False
    holds: tuple[str, ...] = ()  # cache entries in use by the job until it ends
    resumed: bool = False  # its latest checkpoint is in its checkpoint folder
    resume_step: int | None = None


def needs_staging(grant: LeaseGrant) -> bool:
    spec = grant.spec
    return bool(spec.tree or grant.resume) or any(os.path.isabs(path) for path in spec.data)


def _inputs(spec: JobSpec) -> dict[str, str]:
    return {path: digest for path, digest in spec.data.items() if os.path.isabs(path)}


def _top(workdir: str, manifest: Manifest) -> Path:
    """The tree's top on the submitting machine: the working directory, less its place in it."""
    top = Path(workdir)
    for _ in Path(manifest.workdir).parts if manifest.workdir else ():
        top = top.parent
    return top


def place(spec: JobSpec, cache: Cache, hashes: HashCache, fetch: Fetch,
          manifest_of: Callable[[str], Manifest]) -> Placement:
    """Where ``spec`` runs here, with its files made right first."""
    inputs = _inputs(spec)
    manifest = manifest_of(spec.tree) if spec.tree else None
    original = spec.workdir or ""
    there = bool(original) and Path(original).is_dir()
    workdir = original
    paths: dict[str, str] = {}
    notes: list[str] = []
    holds: list[str] = []
    rest = dict(inputs)  # inputs not placed in a copy of the tree
    if manifest is not None:
        top = _top(original, manifest)
        inside: dict[str, str] = {}  # inputs in the job's folder, by their relative path
        for path, digest in inputs.items():
            try:
                rel = Path(path).relative_to(top).as_posix()
            except ValueError:
                continue
            inside[rel] = digest
            del rest[path]
        in_place = there and all(hashes.matches(top / e.path, e.digest) for e in manifest.files) \
            and all(hashes.matches(top / rel, dg) for rel, dg in inside.items())
        if not in_place:
            sized = {rel: (dg, _size(cache, dg, fetch)) for rel, dg in inside.items()}
            key = digest_bytes(f"{spec.tree}\0{sorted(sized.items())}".encode())
            cache.hold(key)
            holds.append(key)
            folder = cache.tree(key, manifest, sized, fetch)
            workdir = str(folder / manifest.workdir if manifest.workdir else folder)
            paths.update({str(top / rel): str(folder / rel) for rel in inside})
            paths[str(top)] = str(folder)  # `python /abs/path/train.py` runs the copy too
            why = (f"its folder {original} is not on this node" if not there else
                   f"files in {original} differ from those it was submitted with")
            notes.append(f"{why}: it runs in a copy of those, {workdir}")
    for path, digest in rest.items():
        if hashes.matches(path, digest):
            continue
        local = cache.named(digest, path, _size(cache, digest, fetch), fetch)
        cache.hold(digest)
        holds.append(digest)
        paths[path] = str(local)
        notes.append(f"input {path} "
                     f"{'differs from the one submitted' if os.path.exists(path) else 'is not on this node'}"
                     f": it reads the one submitted, {local}")
    if not workdir or not Path(workdir).is_dir():
        workdir = ""  # a built-in trainer's job whose folder is not here: the node's own
    return Placement(workdir=workdir, paths=paths, how="\n".join(notes), holds=tuple(holds))


def _size(cache: Cache, digest: str, fetch: Fetch) -> int:
    path = cache.blob(digest, fetch)
    return path.stat().st_size


class Stager(Background):
    """Stages leases in a thread; ``ready()`` gives (grant, placement) pairs."""

    name = "evo-stage"

    def __init__(self, cache: Cache, connect: Callable[[], object], checkpoints: Path) -> None:
        super().__init__(connect)
        self.cache = cache
        self.hashes = HashCache()
        self.checkpoints = checkpoints  # a job's folder is checkpoints/JOB/checkpoints
        self._cancelled: set[str] = set()
        self._manifests: dict[str, Manifest] = {}
        self.pending: dict[str, LeaseGrant] = {}  # job id -> grant, until it is ready

    def submit(self, grant: LeaseGrant) -> None:
        self.pending[grant.job_id] = grant
        self.put(grant)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def ready(self) -> list[tuple[LeaseGrant, Placement]]:
        done = super().ready()
        out = []
        for grant, placement in done:
            self.pending.pop(grant.job_id, None)
            with self._lock:  # cancelled after it was staged, before it was read here
                if grant.job_id in self._cancelled:
                    self._cancelled.discard(grant.job_id)
                    placement = placement._replace(cancelled=True)
            out.append((grant, placement))
        return out

    def release(self, placement: Placement) -> None:
        """The job that ``placement`` was for has ended: its cache entries may be evicted."""
        for key in placement.holds:
            self.cache.release(key)

    # --- the thread ---------------------------------------------------------------------------

    def _failed(self, grant: LeaseGrant, why: str) -> tuple[LeaseGrant, Placement]:
        return grant, Placement(error=f"could not stage the job's files: {why}")

    def _work(self, grant: LeaseGrant) -> tuple[LeaseGrant, Placement]:
        with self._lock:
            cancelled = grant.job_id in self._cancelled
            self._cancelled.discard(grant.job_id)
        if cancelled:
            return grant, Placement(cancelled=True)
        placement = self._stage(grant)
        with self._lock:
            if grant.job_id in self._cancelled:
                self._cancelled.discard(grant.job_id)
                placement = placement._replace(cancelled=True)
        return grant, placement

    def _stage(self, grant: LeaseGrant) -> Placement:
        t0 = time.monotonic()
        try:
            placement = place(grant.spec, self.cache, self.hashes, self._fetch, self._manifest)
            if grant.resume:
                placement = self._resume(grant, placement)
        except StoreFailed as exc:
            return Placement(error=str(exc), retryable=exc.retryable)
        except (OSError, ValueError) as exc:
            return Placement(error=f"could not stage the job's files: {exc}")
        finally:
            try:
                self.cache.evict()
            except OSError as exc:
                log.warning("the cache could not be trimmed: %s", exc)
        if placement.how:
            log.info("%s staged in %.2fs: %s", grant.job_id, time.monotonic() - t0,
                     placement.how.replace("\n", "; "))
        return placement

    def _resume(self, grant: LeaseGrant, placement: Placement) -> Placement:
        """The job's latest stored checkpoint, in its checkpoint folder on this node (files
        that already have their digests there are left as they are)."""
        folder = self.checkpoints / grant.job_id / "checkpoints"
        try:
            manifest = self._manifest(grant.resume)
            restored = restore(manifest, folder, self.cache, self.hashes, self._fetch)
        except (StoreFailed, OSError, ValueError) as exc:  # start from nothing, not never
            note = f"its checkpoint {grant.resume[:12]} could not be restored ({exc}): it starts anew"
            return placement._replace(how="\n".join(filter(None, [placement.how, note])))
        note = (f"checkpoint at step {grant.resume_step} restored into {folder} "
                f"({restored} file(s) fetched)" if restored else "")
        return placement._replace(how="\n".join(filter(None, [placement.how, note])),
                                  resume_step=grant.resume_step, resumed=True)

    def _manifest(self, tree: str) -> Manifest:
        m = self._manifests.get(tree)
        if m is None:
            raw = self.cache.blob(tree, self._fetch).read_bytes()
            if digest_bytes(raw) != tree:
                raise StoreFailed(f"the manifest {tree[:12]} does not match its digest")
            m = self._manifests[tree] = decode_manifest(raw)
        return m

    def _fetch(self, digest: str, dest: Path) -> int:
        return self.call(f"fetch {digest[:12]} from the broker",
                         lambda client: client.fetch(digest, dest))


def restore(manifest: Manifest, folder: Path, cache: Cache, hashes: HashCache,
            fetch: Fetch) -> int:
    """Write ``manifest``'s files under ``folder`` (copies: a job writes its checkpoints in
    place); how many had to be written."""
    n = 0
    for e in manifest.files:
        target = folder / e.path
        if hashes.matches(target, e.digest):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.evo-restore")
        shutil.copyfile(cache.blob(e.digest, fetch, e.size), tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        n += 1
    return n
