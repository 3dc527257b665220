"""A job's files by content: which files are its code, their digests, and the manifest.

At submit the client lists the job's code (in a git tree: the files git tracks plus the
untracked ones it does not ignore, from the repository's top, so that a script in a subfolder
still finds its siblings; elsewhere: the working directory's files), minus what `.evoignore`
names, and stores each file in the broker's content store by sha256. The manifest (one JSON
document: every file's path, digest, size and executable bit, and where the working directory
is inside the tree) is stored the same way; its digest is the job's ``JobSpec.tree``. A node
runs the job in a copy made from the manifest, or in the original folder when that is on the
node and every file still has its recorded digest.

Inputs (a trainer's ``data``, ``--input PATH``) are single files recorded in ``JobSpec.data``
(absolute path -> sha256) and stored the same way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import msgspec

from evo.errors import BadInput
from evo.home import HOME_MARK

IGNORE_FILE = ".evoignore"
# Never a job's code: version control, evo's own homes, environments and caches.
SKIP_DIRS = frozenset({".git", ".hg", ".svn", ".evo", ".evo-demo", ".venv", "venv",
                       "__pycache__", "node_modules", ".mypy_cache", ".pytest_cache", ".tox",
                       ".ipynb_checkpoints"})


def max_code_bytes() -> int:
    return int(float(os.environ.get("EVO_MAX_CODE_MB", "256")) * (1 << 20))


def max_code_files() -> int:
    return int(os.environ.get("EVO_MAX_CODE_FILES", "20000"))


class Entry(msgspec.Struct, frozen=True, array_like=True):
    path: str  # relative to the tree's top, '/'-separated
    digest: str
    size: int
    exe: bool = False


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    files: list[Entry]
    workdir: str = ""  # the working directory inside the tree ("" is its top)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Manifest)


def encode_manifest(m: Manifest) -> bytes:
    return _encoder.encode(Manifest(files=sorted(m.files, key=lambda e: e.path),
                                    workdir=m.workdir))


def decode_manifest(raw: bytes) -> Manifest:
    m = _decoder.decode(raw)
    for e in m.files:
        if not safe_relative(e.path) or not is_digest(e.digest) or e.size < 0:
            raise ValueError(f"manifest entry {e.path!r}: not a safe relative path and digest")
    if m.workdir and not safe_relative(m.workdir):
        raise ValueError(f"manifest workdir {m.workdir!r} is not a safe relative path")
    return m


def is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def safe_relative(path: str) -> bool:
    """A '/'-separated relative path that stays inside its folder (no '..', no absolute)."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and "\\" not in path and "\0" not in path \
        and all(p not in ("", ".", "..") for p in parts)


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path | str) -> tuple[str, int]:
    """(sha256, size) of a file's bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class HashCache:
    """Digests of files seen before, by (size, mtime, inode): a file is read again only when
    one of them changed, as git's index does."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, int, str]] = {}

    def digest(self, path: Path | str) -> tuple[str, int]:
        key = str(path)
        st = os.stat(key)
        hit = self._seen.get(key)
        if hit is not None and hit[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            return hit[3], st.st_size
        digest, size = hash_file(key)
        if size == st.st_size:  # not caught mid-write
            self._seen[key] = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
        return digest, size

    def matches(self, path: Path | str, digest: str) -> bool:
        try:
            return self.digest(path)[0] == digest
        except OSError:
            return False


# --- which files are a job's code ------------------------------------------------------------


def git_output(path: Path, *args: str, timeout_s: float = 30) -> bytes | None:
    """What ``git -C path ARGS`` prints, or None when it fails (no git, not a tree, slow)."""
    try:
        r = subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                           timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _ignore_patterns(top: Path) -> list[str]:
    try:
        text = (top / IGNORE_FILE).read_text()
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore-like: a pattern with no '/' matches any path component; one with '/' matches
    the path from the top (a leading '/' anchors it, a trailing '/' is allowed)."""
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        if "/" in pat:
            pat = pat.lstrip("/")
            if fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(rel, pat + "/*") \
                    or any(fnmatch.fnmatchcase("/".join(parts[:i]), pat)
                           for i in range(1, len(parts))):
                return True
        elif any(fnmatch.fnmatchcase(p, pat) for p in parts):
            return True
    return False


def code_files(workdir: Path, most: int | None = None,
               exclude: tuple[Path, ...] = ()) -> tuple[Path, str, list[str]]:
    """(the tree's top, the working directory inside it, the files' '/'-paths from the top).
    Never inside an evo home (a folder with HOME_MARK, or one of ``exclude``), whatever its
    name. A folder walk stops past ``most`` files (a home folder is not read to its end to be
    told it is too big)."""
    skip = {Path(p).absolute() for p in exclude}
    workdir = Path(workdir).absolute()
    top_out = git_output(workdir, "rev-parse", "--show-toplevel")
    if top_out is not None:
        top = Path(top_out.decode().strip()).absolute()
        listed = git_output(top, "ls-files", "-z", "--cached", "--others", "--exclude-standard") or b""
        names = sorted({n for n in listed.decode(errors="surrogateescape").split("\0") if n})
        names = [n for n in names if not (set(n.split("/")) & SKIP_DIRS)]
        homes = _homes_among(top, names, skip)
        names = [n for n in names if not any(n.startswith(h) for h in homes)]
    else:
        top = workdir
        names = []
        for dirpath, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS
                             and not _is_home(Path(dirpath, d), skip))
            rel = Path(dirpath).relative_to(top)
            names += [(rel / f).as_posix() for f in sorted(files)]
            if most is not None and len(names) > most:
                break
    try:
        inside = workdir.resolve().relative_to(top.resolve()).as_posix()
    except ValueError:
        inside = ""
    patterns = _ignore_patterns(top)
    names = sorted(n for n in names if not _ignored(n, patterns))
    return top, "" if inside == "." else inside, names


def _is_home(path: Path, skip: set[Path]) -> bool:
    return (path / HOME_MARK).exists() or path.absolute() in skip


def _homes_among(top: Path, names: list[str], skip: set[Path]) -> list[str]:
    """The '/'-prefixes of ``names`` that are evo homes (each folder looked at once)."""
    seen: dict[str, bool] = {}
    homes = []
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen:
                seen[d] = _is_home(top / d, skip)
                if seen[d]:
                    homes.append(d + "/")
            if seen[d]:
                break
    return homes


def build_tree(workdir: Path | str, hashes: HashCache | None = None,
               exclude: tuple[Path, ...] = ()) -> tuple[Manifest, dict[str, Path]]:
    """The manifest of a job's code in ``workdir`` and where each digest's bytes are.

    Bounded: past EVO_MAX_CODE_MB (256) or EVO_MAX_CODE_FILES (20,000) it is refused with the
    largest files named, before anything is sent."""
    hashes = hashes or HashCache()
    limit_bytes, limit_files = max_code_bytes(), max_code_files()
    top, inside, names = code_files(Path(workdir), most=limit_files, exclude=exclude)
    sized: list[tuple[str, Path, os.stat_result]] = []
    total = 0
    for name in names:
        if total > limit_bytes or len(sized) > limit_files:
            break  # over already: said below
        path = top / name
        try:
            st = os.stat(path)  # a link is followed: its target is what the job reads
        except OSError:
            continue  # tracked but deleted, or a dangling link
        if not stat.S_ISREG(st.st_mode):
            continue  # a submodule's folder, a socket
        sized.append((name, path, st))
        total += st.st_size
    fix = (f"name what the job does not need in {top / IGNORE_FILE}, pass data files with "
           f"--input, or raise EVO_MAX_CODE_MB / EVO_MAX_CODE_FILES")
    if len(sized) > limit_files:
        raise BadInput(f"the code of {workdir} has over {limit_files:,} files, the bound for "
                       f"what a job takes with it: {fix}")
    if total > limit_bytes:
        big = sorted(sized, key=lambda t: -t[2].st_size)[:3]
        raise BadInput(
            f"the code of {workdir} is {'at least ' if len(sized) < len(names) else ''}"
            f"{total / (1 << 20):,.1f} MiB, over the bound of {limit_bytes / (1 << 20):.3g} MiB "
            f"for what a job takes with it (largest: "
            f"{', '.join(f'{n} {st.st_size / (1 << 20):,.1f} MiB' for n, _, st in big)}): {fix}")
    entries: list[Entry] = []
    where: dict[str, Path] = {}
    for name, path, st in sized:
        try:
            digest, size = hashes.digest(path)
        except OSError:
            continue
        entries.append(Entry(path=name, digest=digest, size=size,
                             exe=bool(st.st_mode & stat.S_IXUSR)))
        where[digest] = path
    return Manifest(files=entries, workdir=inside), where


# --- the record of a job's code ----------------------------------------------------------------


def code_record(workdir: Path | str, manifest: Manifest | None = None,
                tree: str = "") -> dict[str, str]:
    """What code a job submitted from ``workdir`` runs, for the record (``JobSpec.code``) and
    for `evo audit`: the digest of the manifest of the files that go with it (``tree``: the
    same files, by the same rule) and, in a git tree, the commit. A built-in trainer's code is
    evo's own (its version is in the attempt's environment): only the commit, if any."""
    out: dict[str, str] = {}
    commit = git_output(Path(workdir), "rev-parse", "HEAD", timeout_s=10)
    if commit is not None:
        out["git_commit"] = commit.decode().strip()
    if tree and manifest is not None:
        out["tree"], out["files"] = tree, str(len(manifest.files))
    return out


def tree_digest(manifest: Manifest) -> str:
    return digest_bytes(encode_manifest(manifest))


def code_changes(recorded: dict[str, str], now: dict[str, str],
                 before: Manifest | None = None, after: Manifest | None = None,
                 most: int = 5) -> str:
    """How the code a job recorded differs from ``now`` ("" when it does not); given the
    manifests of both, which files changed, were added or are gone."""
    parts = []
    if recorded.get("git_commit") != now.get("git_commit"):
        parts.append(f"git commit {recorded.get('git_commit', 'none')[:12]} -> "
                     f"{now.get('git_commit', 'none')[:12]}")
    if "tree" in recorded and recorded["tree"] != now.get("tree"):
        if before is None or after is None:
            parts.append("its files differ from those submitted")
        else:
            was = {e.path: e.digest for e in before.files}
            now_ = {e.path: e.digest for e in after.files}
            names = ([f"{n} changed" for n in sorted(was.keys() & now_.keys()) if was[n] != now_[n]]
                     + [f"{n} added" for n in sorted(now_.keys() - was.keys())]
                     + [f"{n} gone" for n in sorted(was.keys() - now_.keys())])
            more = f" and {len(names) - most} more" if len(names) > most else ""
            parts.append(", ".join(names[:most]) + more if names
                         else "its working directory moved inside its tree")
    return "; ".join(parts)
