"""Job output shipped by nodes, kept beside the event log: ``EVO_HOME/logs/JOB/attempt-N.STREAM``.

Output is not an event: it can be large, it is not needed to rebuild any state, and losing the
last chunk of a crashed node is acceptable where losing an event is not. Writes are idempotent
by offset, so a node that resends after a reconnect never duplicates a line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STREAMS = ("stdout", "stderr")
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


class OutputStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, job_id: str, attempt: int, stream: str) -> Path:
        if not _SAFE.match(job_id) or stream not in STREAMS or attempt < 1:
            raise ValueError(f"bad output address {job_id!r} attempt {attempt} {stream!r}")
        return self.root / job_id / f"attempt-{attempt}.{stream}"

    def write(self, job_id: str, attempt: int, stream: str, offset: int, data: bytes) -> int:
        """Append ``data`` if ``offset`` is the stored size; returns the size afterwards."""
        path = self.path(job_id, attempt, stream)
        size = path.stat().st_size if path.exists() else 0
        if offset != size or not data:
            return size
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)
        return size + len(data)

    def attempts(self, job_id: str) -> list[int]:
        d = self.root / job_id
        if not _SAFE.match(job_id) or not d.is_dir():
            return []
        found = {int(m.group(1)) for name in os.listdir(d)
                 if (m := re.match(r"attempt-(\d+)\.", name))}
        return sorted(found)

    def read(self, job_id: str, attempt: int, stream: str, offset: int,
             limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes from ``offset``, and the stored size."""
        path = self.path(job_id, attempt, stream)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(max(0, min(limit, 8 << 20))), size
        except FileNotFoundError:
            return b"", 0
