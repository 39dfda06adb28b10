"""Permission denied on a file or folder, also for root (who reads chmod-000 files anyway).

``deny(path, monkeypatch)`` chmods ``path`` to 000 and, when the tests run as root, makes
``builtins.open``, ``io.open``, ``os.listdir`` and ``os.scandir`` of that path raise the
``PermissionError`` an ordinary user gets, so a test proves the message either way.
"""

import builtins
import errno
import io
import os
from pathlib import Path


def _denied(path):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def deny(path, monkeypatch):
    path = Path(path).resolve()
    os.chmod(path, 0)  # pytest's cleanup of tmp_path restores modes it needs
    if os.geteuid() != 0:
        return
    real_open, real_listdir, real_scandir = builtins.open, os.listdir, os.scandir

    def hit(p):
        return isinstance(p, (str, bytes, os.PathLike)) and Path(os.fsdecode(p)).resolve() == path

    def fake_open(file, *args, **kwargs):
        if hit(file):
            raise _denied(file)
        return real_open(file, *args, **kwargs)

    def fake_listdir(p="."):
        if hit(p):
            raise _denied(p)
        return real_listdir(p)

    def fake_scandir(p="."):
        if hit(p):
            raise _denied(p)
        return real_scandir(p)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "listdir", fake_listdir)
    monkeypatch.setattr(os, "scandir", fake_scandir)
