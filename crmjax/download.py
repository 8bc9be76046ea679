"""Fetching a dataset's distribution files: HTTP(S) download, checksum, atomic install.

Standard library only (``urllib``, ``hashlib``, ``tarfile``, ``zipfile``) plus ``tqdm`` for the
progress bar. Knows nothing about datasets: ``crmjax.data`` says which files to fetch and
where they belong.

Guarantees:

* **Fails fast without a network.** Every socket operation (connect, each read) has a
  timeout of ``TIMEOUT_S`` seconds; an unreachable host, a refused connection or a stalled
  server raises :class:`DownloadError` within seconds, never hangs.
* **Nothing half-written is trusted.** A file is streamed into a private temporary folder
  inside the destination directory, its size and checksum are verified, archives are
  extracted there, and only the finished, verified result is moved into place with one
  ``os.rename`` (atomic on one file system). Any failure (checksum mismatch, connection lost
  mid-download, corrupt archive, Ctrl-C) removes the temporary folder; a process killed
  outright leaves only a ``.crmjax-download-*`` folder that no loader reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import tqdm

__all__ = ["DownloadError", "Remote", "TIMEOUT_S", "fetch", "install", "probe", "resolve_url"]

# Seconds allowed for the connection and for each read. Short: without a network the command
# must fail at once with the message naming the fix, not hang.
TIMEOUT_S = 15.0
_CHUNK = 1 << 20
_TMP_PREFIX = ".crmjax-download-"
_USER_AGENT = "crmjax (python urllib)"


class DownloadError(OSError):
  """A download failed (no network, HTTP error, interrupted, wrong checksum, bad archive).

  Nothing of it was left in the destination directory.
  """


@dataclasses.dataclass(frozen=True)
class Remote:
  """One published file and how to check it.

  Attributes:
    filename: the file's name (also its name under a mirror URL).
    url: its canonical URL.
    size: its size in bytes (progress bar total when the server sends no length; checked).
    sha256: its published SHA-256 (hex), or None.
    md5: its published MD5 (hex), or None (used where no SHA-256 is published).
    source: where the checksums are published (documentation).
  """

  filename: str
  url: str
  size: int | None = None
  sha256: str | None = None
  md5: str | None = None
  source: str = ""


def resolve_url(remote: Remote, mirror: str | None) -> str:
  """``remote.url``, or ``<mirror>/<filename>`` when a mirror (base URL) is given."""
  if mirror:
    return mirror.rstrip("/") + "/" + remote.filename
  return remote.url


def fetch(
  remote: Remote, dest: str | os.PathLike[str], *, mirror: str | None = None, progress: bool = True
) -> Path:
  """Downloads ``remote`` to the file ``dest`` and verifies its size and checksums.

  ``dest`` appears only once complete and verified (written as ``dest + '.part'``, then
  renamed); on any failure the partial file is removed.

  Args:
    remote: what to download.
    dest: the destination file.
    mirror: optional base URL replacing the canonical one (see ``resolve_url``).
    progress: show a tqdm progress bar (stderr).

  Returns:
    ``Path(dest)``.

  Raises:
    DownloadError: naming the URL and the reason.
  """
  dest = Path(dest)
  url = resolve_url(remote, mirror)
  part = dest.with_name(dest.name + ".part")
  hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
  received = 0
  try:
    with _open(url) as response, open(part, "wb") as out:
      length = response.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else remote.size
      with tqdm.tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"downloading {remote.filename}",
        disable=not progress,
        mininterval=1.0,
        file=sys.stderr,
      ) as bar:
        while True:
          try:
            chunk = response.read(_CHUNK)
          except (OSError, http.client.HTTPException) as e:
            raise DownloadError(
              f"downloading {url} was interrupted after {received} of {total or '?'}"
              f" bytes: {_reason(e)}"
            ) from e
          if not chunk:
            break
          out.write(chunk)
          for h in hashes.values():
            h.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
      if total is not None and received != total:
        raise DownloadError(
          f"downloading {url} was interrupted after {received} of {total} bytes"
          " (the connection closed early)"
        )
    for kind in ("sha256", "md5"):
      expected = getattr(remote, kind)
      got = hashes[kind].hexdigest()
      if expected and got != expected.lower():
        raise DownloadError(
          f"checksum mismatch for {url}: expected {kind} {expected}, got {got}"
          f" ({received} bytes); the file was deleted. A proxy or mirror may have served"
          " something else: retry, or download it by hand and check it"
          + (f" (checksum published by {remote.source})" if remote.source else "")
        )
    os.replace(part, dest)
  except BaseException:
    part.unlink(missing_ok=True)
    raise
  return dest


def probe(remote: Remote, *, mirror: str | None = None) -> None:
  """Opens (and closes) the connection to ``remote``: raises ``DownloadError`` if unreachable."""
  with _open(resolve_url(remote, mirror)):
    pass


@contextlib.contextmanager
def _open(url: str) -> Iterator[http.client.HTTPResponse]:
  request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 (http/https)
  except urllib.error.HTTPError as e:
    raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
  except (OSError, http.client.HTTPException, ValueError) as e:
    raise DownloadError(f"cannot download {url}: {_reason(e)}") from e
  with response:
    yield response


def _reason(e: BaseException) -> str:
  if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
    e = e.reason if isinstance(e.reason, BaseException) else e
  if isinstance(e, (socket.timeout, TimeoutError)):
    return f"no answer within {TIMEOUT_S:g} s (no network, or the server is down)"
  if isinstance(e, socket.gaierror):
    return f"cannot resolve the host name ({e}): no network?"
  return f"{type(e).__name__}: {e}"


def install(
  remotes: tuple[Remote, ...],
  directory: str | os.PathLike[str],
  *,
  members: tuple[str, ...],
  folder: str = "",
  mirror: str | None = None,
  progress: bool = True,
) -> None:
  """Downloads ``remotes``, extracts archives among them, and moves ``members`` into place.

  Everything happens in a private temporary folder inside ``directory``: files are fetched
  into its sub-folder ``folder`` and verified (``fetch``), ``.tar.gz`` / ``.tgz`` / ``.zip``
  files are extracted (entries that would land outside the folder are refused), and then
  each name in ``members`` (a path relative to the temporary folder, e.g.
  ``'cifar-10-batches-py'`` or ``'mnist/train-images-idx3-ubyte.gz'``) is renamed to the
  same path under ``directory``. A member that already exists there is left alone (another
  process finished first).

  Raises:
    DownloadError: download or checksum failure, a corrupt archive, or an archive without
      an expected member. ``directory`` is then unchanged.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=directory))
  try:
    (tmp / folder).mkdir(parents=True, exist_ok=True)
    for remote in remotes:
      path = fetch(remote, tmp / folder / remote.filename, mirror=mirror, progress=progress)
      if _is_archive(path):
        _extract(path, tmp / folder, progress=progress)
        path.unlink()
    missing = [m for m in members if not (tmp / m).exists()]
    if missing:
      raise DownloadError(
        f"the downloaded files {[r.filename for r in remotes]} do not contain {missing}:"
        " not the expected distribution layout"
      )
    for member in members:
      target = directory / member
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        continue
      try:
        os.rename(tmp / member, target)
      except OSError:
        if not target.exists():  # Not a concurrent install of the same member.
          raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _is_archive(path: Path) -> bool:
  return path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))


def _extract(archive: Path, into: Path, *, progress: bool) -> None:
  """Extracts a tar or zip archive into ``into``, refusing entries that escape it."""
  root = into.resolve()

  def safe(name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents

  try:
    if archive.name.endswith(".zip"):
      with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        bad = [n for n in names if not safe(n)]
        if bad:
          raise DownloadError(f"{archive.name}: refusing entries outside the folder: {bad[:3]}")
        for name in tqdm.tqdm(
          names,
          desc=f"extracting {archive.name}",
          unit=" files",
          disable=not progress,
          mininterval=1.0,
          file=sys.stderr,
        ):
          z.extract(name, into)
    else:
      with tarfile.open(archive) as t:
        members = t.getmembers()
        bad = [m.name for m in members if not safe(m.name) or not (m.isfile() or m.isdir())]
        if bad:
          raise DownloadError(
            f"{archive.name}: refusing links or entries outside the folder: {bad[:3]}"
          )
        for member in tqdm.tqdm(
          members,
          desc=f"extracting {archive.name}",
          unit=" files",
          disable=not progress,
          mininterval=1.0,
          file=sys.stderr,
        ):
          t.extract(member, into, set_attrs=False, **_tar_filter())
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    if isinstance(e, DownloadError):
      raise
    raise DownloadError(f"cannot extract {archive.name}: {type(e).__name__}: {e}") from e


def _tar_filter() -> dict:
  # Python >= 3.11.4 (and backports) take a member filter; 'data' refuses anything unsafe.
  return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
