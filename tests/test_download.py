"""Downloads (crmjax.download, data.load_split(download=True)) against a loopback server.

Every test serves small archives in the standard layouts (tests/fake_datasets.py) from an
HTTP server on 127.0.0.1 that the test starts; the published URLs and checksums are
replaced by the loopback ones, so no test sends anything beyond this machine.
"""

import dataclasses
import hashlib
import http.server
import os
import socket
import threading
import time

import numpy as np
import pytest

from crmjax import data, tfds_source
from crmjax import download as download_lib
from tests import fake_datasets


class _Server:
  """A loopback HTTP server of ``files``; ``cut`` names are served half, then hung up."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.cut: set[str] = set()
    self.requests: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's naming)
        name = self.path.lstrip("/")
        server.requests.append(name)
        if name not in server.files:
          self.send_error(404, "Not Found")
          return
        body = server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in server.cut:
          self.wfile.write(body[: len(body) // 2])
          self.wfile.flush()
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        self.wfile.write(body)

      def log_message(self, *args):
        del args

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def _closed_port_url():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"  # Nothing listens there: connection refused.


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(data.DOWNLOAD_URL_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setattr(data, "_VENDORED_DATA_DIR", tmp_path / "no-vendored")
  # TFDS's own downloader would go to the real URLs: only the TFDS tests below enable it.
  monkeypatch.setattr(tfds_source, "can_prepare", lambda name: False)
  # Any remote left unpatched points at a closed loopback port, never at the internet.
  closed = _closed_port_url()
  for name, dist in list(data._DISTRIBUTIONS.items()):
    remotes = tuple(dataclasses.replace(r, url=f"{closed}/{r.filename}") for r in dist.remotes)
    monkeypatch.setitem(data._DISTRIBUTIONS, name, dataclasses.replace(dist, remotes=remotes))


def _publish(monkeypatch, server, name, files, *, wrong_checksum=False):
  """Serves ``files`` as dataset ``name``'s distribution, with their checksums."""
  dist = data._DISTRIBUTIONS[name]
  remotes = []
  for r in dist.remotes:
    payload = files[r.filename]
    server.files[r.filename] = payload
    sha = "0" * 64 if wrong_checksum else hashlib.sha256(payload).hexdigest()
    remotes.append(
      dataclasses.replace(
        r,
        url=f"{server.url}/{r.filename}",
        size=len(payload),
        sha256=sha,
        md5=hashlib.md5(payload).hexdigest(),
      )
    )
  monkeypatch.setitem(data._DISTRIBUTIONS, name, dataclasses.replace(dist, remotes=tuple(remotes)))


def _cifar(monkeypatch, server, seed=0, **kw):
  batches = fake_datasets.cifar_batches(np.random.default_rng(seed))
  _publish(
    monkeypatch,
    server,
    "cifar10",
    {"cifar-10-python.tar.gz": fake_datasets.cifar_tarball(batches)},
    **kw,
  )
  return batches


def _assert_cifar(images, labels, batches, split):
  names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
  np.testing.assert_array_equal(images, np.concatenate([batches[n][0] for n in names]))
  np.testing.assert_array_equal(labels, np.concatenate([batches[n][1] for n in names]))


# --------------------------------------------------------------------------
# Success, and a second run that finds the data
# --------------------------------------------------------------------------


def test_cifar10_is_downloaded_verified_extracted_then_found_again(tmp_path, monkeypatch, server):
  batches = _cifar(monkeypatch, server)
  d = tmp_path / "d"
  images, labels = data.load_split("cifar10", "train", data_dir=d, download=True)
  _assert_cifar(images, labels, batches, "train")
  assert server.requests == ["cifar-10-python.tar.gz"]
  # Only the extracted folder is left: no archive, no temporary folder.
  assert sorted(p.name for p in d.iterdir()) == ["cifar-10-batches-py"]
  assert "batches.meta" in os.listdir(d / "cifar-10-batches-py")
  # A second run (the other split, and strictly offline) finds it; nothing is downloaded.
  images, labels = data.load_split("cifar10", "test", data_dir=d, download=True)
  _assert_cifar(images, labels, batches, "test")
  images, labels = data.load_split("cifar10", "test", data_dir=d, download=False)
  _assert_cifar(images, labels, batches, "test")
  assert server.requests == ["cifar-10-python.tar.gz"]


def test_default_destination_is_the_cache_and_a_mirror_url_is_used(tmp_path, monkeypatch, server):
  batches = _cifar(monkeypatch, server)
  # The published URL is unreachable; the mirror (same file name) serves the file.
  dist = data._DISTRIBUTIONS["cifar10"]
  remote = dataclasses.replace(dist.remotes[0], url=f"{_closed_port_url()}/x.tar.gz")
  monkeypatch.setitem(data._DISTRIBUTIONS, "cifar10", dataclasses.replace(dist, remotes=(remote,)))
  monkeypatch.setenv(data.DOWNLOAD_URL_ENV, server.url + "/")
  images, labels = data.load_split("cifar10", "test", download=True, progress=False)
  _assert_cifar(images, labels, batches, "test")
  assert (tmp_path / "cache" / "crmjax" / "cifar-10-batches-py" / "test_batch").is_file()
  monkeypatch.delenv(data.DOWNLOAD_URL_ENV)
  images, _ = data.load_split("cifar10", "train")  # Found in the cache, offline.
  assert server.requests == ["cifar-10-python.tar.gz"]


def test_tiny_imagenet_zip(tmp_path, monkeypatch, server):
  _publish(
    monkeypatch,
    server,
    "tiny_imagenet",
    {"tiny-imagenet-200.zip": fake_datasets.tiny_imagenet_zip()},
  )
  d = tmp_path / "d"
  images, labels = data.load_split("tiny_imagenet", "test", data_dir=d, download=True)
  assert images.shape == (4, 64, 64, 3)
  np.testing.assert_array_equal(labels, [1, 2, 0, 0])
  images, labels = data.load_split("tiny_imagenet", "train", data_dir=d)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  assert sorted(p.name for p in d.iterdir()) == ["tiny-imagenet-200"]
  assert server.requests == ["tiny-imagenet-200.zip"]


def test_mnist_idx_files_and_only_the_missing_ones(tmp_path, monkeypatch, server):
  files, arrays = fake_datasets.mnist_files(np.random.default_rng(1))
  _publish(monkeypatch, server, "mnist", files)
  d = tmp_path / "d"
  (d / "mnist").mkdir(parents=True)  # Half a copy: the test labels are already there.
  (d / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])
  images, labels = data.load_split("mnist", "test", data_dir=d, download=True)
  np.testing.assert_array_equal(images, arrays["test"][0])
  np.testing.assert_array_equal(labels, arrays["test"][1])
  assert sorted(server.requests) == sorted(set(files) - {"t10k-labels-idx1-ubyte.gz"})
  images, labels = data.load_split("mnist", "train", data_dir=d)
  np.testing.assert_array_equal(images, arrays["train"][0])
  assert sorted(os.listdir(d)) == ["mnist"] and len(os.listdir(d / "mnist")) == 4


# --------------------------------------------------------------------------
# Failures: a clear error, and nothing left behind
# --------------------------------------------------------------------------


def _only(directory):
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_checksum_mismatch(tmp_path, monkeypatch, server):
  _cifar(monkeypatch, server, wrong_checksum=True)
  d = tmp_path / "d"
  with pytest.raises(FileNotFoundError) as info:
    data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  message = str(info.value)
  assert "checksum mismatch" in message and "expected sha256 " + "0" * 64 in message
  assert "--config.data_dir" in message  # ... and still every way to get the data.
  assert _only(d) == []


def test_server_gone_mid_download(tmp_path, monkeypatch, server):
  _cifar(monkeypatch, server)
  server.cut.add("cifar-10-python.tar.gz")
  d = tmp_path / "d"
  with pytest.raises(FileNotFoundError, match=r"interrupted after \d+ of \d+ bytes"):
    data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  assert _only(d) == []
  server.cut.clear()  # The next run downloads it whole.
  data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  assert _only(d) == ["cifar-10-batches-py"]


def test_no_network_fails_within_seconds_with_the_ways_to_get_the_data(tmp_path):
  d = tmp_path / "d"
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  assert time.monotonic() - start < 5
  message = str(info.value)
  assert "Downloading it failed: cannot download" in message
  assert "Refused" in message or "refused" in message
  assert "$CRMJAX_DATA_DIR" in message and "cifar-10-batches-py/data_batch_1" in message
  assert _only(d) == []


def test_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
  monkeypatch.setattr(download_lib, "TIMEOUT_S", 0.5)
  with socket.socket() as silent:  # Accepts connections (backlog), never answers.
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no answer within 0.5 s"):
      data.load_split(
        "cifar10", "train", data_dir=tmp_path / "d", download=True, download_url=url, progress=False
      )
    assert time.monotonic() - start < 5
  assert _only(tmp_path / "d") == []


def test_http_error_is_named(tmp_path, server):
  with pytest.raises(FileNotFoundError, match="HTTP 404"):
    data.load_split(
      "cifar10",
      "train",
      data_dir=tmp_path / "d",
      download=True,
      download_url=server.url,
      progress=False,
    )
  assert _only(tmp_path / "d") == []


def test_download_off_never_touches_the_network(tmp_path, monkeypatch, server):
  _cifar(monkeypatch, server)
  with pytest.raises(FileNotFoundError, match="Downloading is off"):
    data.load_split("cifar10", "train", data_dir=tmp_path / "d", download=False)
  assert server.requests == []


def test_leftovers_of_a_killed_download_are_not_trusted(tmp_path, monkeypatch, server):
  batches = _cifar(monkeypatch, server)
  d = tmp_path / "d"
  stale = d / ".crmjax-download-killed" / "cifar-10-batches-py"
  stale.mkdir(parents=True)
  (stale / "data_batch_1").write_bytes(b"half a file")
  with pytest.raises(FileNotFoundError):
    data.load_split("cifar10", "train", data_dir=d)  # Offline: the leftover is ignored.
  images, labels = data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  _assert_cifar(images, labels, batches, "train")


def test_an_incomplete_copy_is_reported_not_overwritten(tmp_path, monkeypatch, server):
  _cifar(monkeypatch, server)
  d = tmp_path / "d"
  (d / "cifar-10-batches-py").mkdir(parents=True)
  (d / "cifar-10-batches-py" / "test_batch").write_bytes(b"mine")
  with pytest.raises(FileNotFoundError, match="exist but do not hold the train split"):
    data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
  assert server.requests == []
  assert (d / "cifar-10-batches-py" / "test_batch").read_bytes() == b"mine"


def test_archives_are_checked_before_anything_is_installed(tmp_path, monkeypatch, server):
  d = tmp_path / "d"
  cases = [
    (fake_datasets.tarball({"../escaped.txt": b"x"}), "refusing"),
    (fake_datasets.tarball({"something-else/file": b"x"}), "cifar-10-batches-py"),
    (b"\x1f\x8b not really a gzip file", "cannot extract"),
  ]
  for payload, match in cases:
    _publish(monkeypatch, server, "cifar10", {"cifar-10-python.tar.gz": payload})
    with pytest.raises(FileNotFoundError, match=match):
      data.load_split("cifar10", "train", data_dir=d, download=True, progress=False)
    assert _only(d) == [] and not (tmp_path / "escaped.txt").exists()


def test_fetch_and_install_directly(tmp_path, server):
  payload = os.urandom(3 * 2**20 + 17)  # Several read chunks.
  server.files["blob.bin"] = payload
  remote = download_lib.Remote(
    "blob.bin",
    f"{server.url}/blob.bin",
    size=len(payload),
    sha256=hashlib.sha256(payload).hexdigest(),
  )
  path = download_lib.fetch(remote, tmp_path / "blob.bin", progress=False)
  assert path.read_bytes() == payload and _only(tmp_path) == ["blob.bin"]
  download_lib.install(
    (remote,), tmp_path / "x", members=("sub/blob.bin",), folder="sub", progress=False
  )
  assert (tmp_path / "x" / "sub" / "blob.bin").read_bytes() == payload
  assert _only(tmp_path / "x") == ["sub"]
  bad = dataclasses.replace(remote, md5="0" * 32)
  with pytest.raises(download_lib.DownloadError, match="expected md5"):
    download_lib.fetch(bad, tmp_path / "again.bin", progress=False)
  assert _only(tmp_path) == ["blob.bin", "x"]


# --------------------------------------------------------------------------
# TFDS first where it can prepare the dataset (TensorFlow installed)
# --------------------------------------------------------------------------


class _FakeSource:
  def __init__(self, images, labels):
    self._records = [{"image": x, "label": y} for x, y in zip(images, labels)]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return self._records[i]

  def __getitems__(self, keys):
    return [self._records[k] for k in keys]


def _fake_tfds(monkeypatch, prepare):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []

  def data_source(name, *, split, data_dir, download):
    calls.append((name, split, download))
    if not download:
      raise KeyError("not prepared")
    return prepare(name, split)

  monkeypatch.setattr(tfds, "data_source", data_source)
  monkeypatch.setattr(tfds_source, "can_prepare", lambda name: name != "tiny_imagenet")
  return calls


def test_tfds_prepares_when_it_can(tmp_path, monkeypatch, server):
  _cifar(monkeypatch, server)
  images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  calls = _fake_tfds(monkeypatch, lambda name, split: _FakeSource(images, [1, 2, 3]))
  got, labels = data.load_split(
    "cifar10", "train", data_dir=tmp_path / "d", download=True, progress=False
  )
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(labels, [1, 2, 3])
  assert calls == [("cifar10", "train", False), ("cifar10", "train", True)]
  assert server.requests == ["cifar-10-python.tar.gz"]  # The reachability probe only.
  assert _only(tmp_path / "d") == []


def test_tfds_failure_falls_back_to_the_archive(tmp_path, monkeypatch, server):
  batches = _cifar(monkeypatch, server)

  def fail(name, split):
    raise RuntimeError("TensorFlow is needed to prepare this dataset")

  calls = _fake_tfds(monkeypatch, fail)
  images, labels = data.load_split(
    "cifar10", "train", data_dir=tmp_path / "d", download=True, progress=False
  )
  _assert_cifar(images, labels, batches, "train")
  assert calls[-1] == ("cifar10", "train", True)
  assert server.requests == ["cifar-10-python.tar.gz"] * 2  # Probe, then the download.


def test_tfds_is_not_asked_without_network_or_with_a_mirror(tmp_path, monkeypatch, server):
  batches = _cifar(monkeypatch, server)

  def unexpected(name, split):
    raise AssertionError("TFDS must not download here")

  _fake_tfds(monkeypatch, unexpected)
  images, labels = data.load_split(
    "cifar10",
    "test",
    data_dir=tmp_path / "d",
    download=True,
    download_url=server.url,
    progress=False,
  )
  _assert_cifar(images, labels, batches, "test")
  dist = data._DISTRIBUTIONS["cifar10"]
  remote = dataclasses.replace(dist.remotes[0], url=f"{_closed_port_url()}/x.tar.gz")
  monkeypatch.setitem(data._DISTRIBUTIONS, "cifar10", dataclasses.replace(dist, remotes=(remote,)))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match="cannot download"):
    data.load_split("cifar10", "test", data_dir=tmp_path / "e", download=True, progress=False)
  assert time.monotonic() - start < 5


def test_download_progress_is_shown(tmp_path, monkeypatch, server, capsys):
  _cifar(monkeypatch, server)
  data.load_split("cifar10", "test", data_dir=tmp_path / "d", download=True)
  err = capsys.readouterr().err
  assert "no local copy; downloading" in err and "--config.download=False" in err
  assert "downloading cifar-10-python.tar.gz" in err and "extracting" in err
