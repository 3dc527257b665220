"""A packet tap for the two-machine tests: every frame seen on one interface, appended raw.

    python tests/tap.py IFACE OUT READY

Binds an AF_PACKET socket to IFACE (run it inside the namespace that has it, as root),
touches READY once it listens, and appends each frame to OUT until SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

ETH_P_ALL = 0x0003


def main() -> None:
    iface, out, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ready.touch()
    with open(out, "ab") as f:
        while not stop:
            try:
                frame = sock.recv(65536)
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            f.write(frame)
            f.flush()


if __name__ == "__main__":
    main()
