"""MNIST and Fashion-MNIST as TFDS builders over the original IDX files.

Both builders (TFDS names ``zoo_mnist`` and ``zoo_fashion_mnist``, so they
never collide with TFDS's own ``mnist``) read the four original gzipped IDX
files::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

and store ``image`` (``Tensor`` uint8, 28x28x1) and ``label`` (``ClassLabel``,
10 classes) under the key ``index`` (the example's position in its IDX file).

Where the files come from
-------------------------
Let ``M`` be the manual folder: ``--manual-dir`` when given (TFDS's
``DownloadConfig.manual_dir``), else TFDS's default ``<data_dir>/downloads/manual``.

1. The first of ``M/<mnist|fashion_mnist>/`` and ``M/`` that holds *all four*
   files is used as is (the two datasets share file names, hence the
   sub-folder; a mix-up is caught by the checksums).
2. Otherwise the four files are downloaded with the TFDS download manager
   from :data:`URLS`, after a quick (3 s) connection probe so that an offline
   machine fails at once instead of hanging in retries.
3. Offline with files missing: :class:`shared.styles.ZooError` names the
   missing files and the folder to put them in: ``M`` itself when
   ``--manual-dir`` was given, else ``M/<mnist|fashion_mnist>/``.

Every file, downloaded or local, is checked against :data:`CHECKSUMS` (the
size and sha256 that TFDS itself registers for these URLs, in
``tensorflow_datasets/url_checksums/{mnist,fashion_mnist}.txt``) and then
parsed and validated (magic number, dimensions, counts) before anything is
written. All of this happens in ``_split_generators``, inside TFDS's
``incomplete.*`` folder, so a failure leaves no dataset marked as prepared.
User files are only ever read, never moved, changed or deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import socket
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from shared.errors import ZooError

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

URLS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# (size in bytes, sha256) of every file, copied from the checksums TFDS 4.9
# registers for the URLs above: tensorflow_datasets/url_checksums/mnist.txt
# and fashion_mnist.txt. The MNIST t10k files also match the md5 sums
# 9fb629c4189551a2d022fa330f9573f3 (images) and ec29112dd5afa0611ce80d1b7f02629c (labels).
CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        TRAIN_IMAGES: (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        TRAIN_LABELS: (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        TEST_IMAGES: (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        TEST_LABELS: (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        TRAIN_IMAGES: (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        TRAIN_LABELS: (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        TEST_IMAGES: (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        TEST_LABELS: (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}

FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

IMAGE_SIZE = 28
NUM_CLASSES = 10
PROBE_TIMEOUT_S = 3.0
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data, 3 or 1 dims


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def file_checksum(path: Path) -> tuple[int, str]:
    """``(size, sha256)`` of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify_checksum(dataset: str, filename: str, path: Path) -> None:
    """Raise ZooError unless ``path`` has the published size and sha256 of ``filename``."""
    expected = CHECKSUMS[dataset][filename]
    actual = file_checksum(path)
    if actual == tuple(expected):
        return
    hint = ""
    for other, table in CHECKSUMS.items():
        for other_file, checksum in table.items():
            if tuple(checksum) == actual and (other, other_file) != (dataset, filename):
                hint = f" (it is {other}'s {other_file})"
    raise ZooError(
        f"{path} does not match the published checksum of {dataset} {filename}{hint}: "
        f"expected {expected[0]} bytes, sha256 {expected[1]}; got {actual[0]} bytes, "
        f"sha256 {actual[1]}. Delete or replace that file with the original and run again.")


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse a gzipped IDX file of uint8 ``images`` (N, 28, 28) or ``labels`` (N,).

    The header is a big-endian magic number (0x0803 for 3-D, 0x0801 for 1-D
    unsigned bytes) followed by one big-endian uint32 per dimension; the data
    must fill the rest of the file exactly.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ZooError(f"{path} is not a readable gzip file ({error}); "
                         "replace it with the original IDX file") from None
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ZooError(f"{path} is too short ({len(data)} bytes) to be an IDX {kind} file; "
                         "replace it with the original")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ZooError(f"{path} has IDX magic number {magic:#010x}, expected "
                         f"{_IDX_MAGIC[kind]:#010x} for {kind}; replace it with the original file")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if kind == "images" and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ZooError(f"{path} holds {dims[1]}x{dims[2]} images, expected "
                         f"{IMAGE_SIZE}x{IMAGE_SIZE}; replace it with the original file")
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ZooError(f"{path} has {len(data) - header} data bytes but its header "
                         f"{dims} needs {expected}; the file is truncated or corrupt, "
                         "replace it with the original")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8 and labels (N,) uint8 from a pair of IDX files."""
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise ZooError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels; replace them with the original files")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ZooError(f"{labels_path} has label {labels.max()}, expected 0..{NUM_CLASSES - 1}; "
                         "replace it with the original file")
    return images[..., None], labels


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared code of the two builders; subclasses set the class attributes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The original IDX files, checked against TFDS's checksums."}
    DATASET = ""  # key of URLS and CHECKSUMS, and the manual sub-folder
    DESCRIPTION = ""
    HOMEPAGE = ""
    LABEL_NAMES: tuple[str, ...] | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        if self.LABEL_NAMES:
            label = tfds.features.ClassLabel(names=list(self.LABEL_NAMES))
        else:
            label = tfds.features.ClassLabel(num_classes=NUM_CLASSES)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                "label": label,
            }),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        paths = self._locate_files(dl_manager)
        for filename in FILES:
            verify_checksum(self.DATASET, filename, paths[filename])
        # Parse everything before the first example is written.
        train = read_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
        test = read_split(paths[TEST_IMAGES], paths[TEST_LABELS])
        return {"train": self._generate_examples(*train),
                "test": self._generate_examples(*test)}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for index in range(len(labels)):
            yield index, {"image": images[index], "label": int(labels[index])}

    def _manual_dirs(self, dl_manager) -> tuple[list[Path], Path]:
        """The folders searched, in order, and the one to name in error messages."""
        default = Path(self.data_dir_root) / "downloads" / "manual"
        manual = getattr(dl_manager, "_manual_dir", None)  # DownloadConfig.manual_dir or default
        manual = Path(manual) if manual else default
        subdir = manual / self.DATASET
        explicit = manual.resolve() != default.resolve()
        return [subdir, manual], (manual if explicit else subdir)

    def _locate_files(self, dl_manager) -> dict[str, Path]:
        folders, advertised = self._manual_dirs(dl_manager)
        for folder in folders:
            if all((folder / filename).is_file() for filename in FILES):
                return {filename: folder / filename for filename in FILES}
        missing = [f for f in FILES if not (advertised / f).is_file()] or list(FILES)
        where = (f"put {', '.join(missing)} in {advertised}/ "
                 "(or pass another folder with --manual-dir)")
        base = URLS[self.DATASET]
        if not _reachable(base):
            raise ZooError(f"cannot reach {urllib.parse.urlsplit(base).hostname} to download "
                             f"{self.DATASET}; {where}.")
        try:
            downloaded = dl_manager.download({filename: base + filename for filename in FILES})
        except Exception as error:  # noqa: BLE001 - every download failure means the same to the user
            raise ZooError(f"downloading {self.DATASET} from {base} failed ({error}); "
                             f"{where}.") from None
        return {filename: Path(path) for filename, path in downloaded.items()}


class ZooMnist(_IdxBuilder):
    """The MNIST handwritten digits: 60,000 train and 10,000 test images, 28x28."""

    DATASET = "mnist"
    DESCRIPTION = "The MNIST database of handwritten digits, 28x28 grayscale, 10 classes."
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put the four MNIST IDX files (" + ", ".join(FILES) + ") in "
        "<manual_dir>/mnist/ or <manual_dir>/; otherwise they are downloaded from "
        + URLS["mnist"])


class ZooFashionMnist(_IdxBuilder):
    """Zalando's Fashion-MNIST: 60,000 train and 10,000 test images, 28x28."""

    DATASET = "fashion_mnist"
    DESCRIPTION = "Zalando's Fashion-MNIST article images, 28x28 grayscale, 10 classes."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    LABEL_NAMES = FASHION_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put the four Fashion-MNIST IDX files (" + ", ".join(FILES) + ") in "
        "<manual_dir>/fashion_mnist/ or <manual_dir>/; otherwise they are downloaded from "
        + URLS["fashion_mnist"])
