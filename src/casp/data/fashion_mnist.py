"""Fashion-MNIST (Zalando, MIT): 70,000 real grey 28 × 28 photos of clothing in ten classes.

It ships in Debian's `dataset-fashion-mnist` package. `images(split)` reads it where the package
installs it, else from casp's cache, where `fetch()` puts it once: `apt-get download` of the same
package, unpacked with Python (a .deb is an `ar` archive holding `data.tar.xz`).

Splits never overlap: train is the first 55,000 images of the training file, validation its last
5,000, test the separate 10,000-image test file.
"""
from __future__ import annotations

import gzip
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from casp.errors import CaspError

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SPLITS = ("train", "validation", "test")
TRAIN_SIZE = 55_000
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MEMBER_PREFIX = "./usr/share/datasets/fashion-mnist/"


def cache_location() -> Path:
    from casp.models.real_models import cache_dir

    return cache_dir() / "sources" / "fashion-mnist"


def data_dir() -> Path | None:
    """The folder holding the four IDX files, None when neither the package nor the cache has them."""
    for d in (SYSTEM_DIR, cache_location()):
        if all((d / f).is_file() for pair in FILES.values() for f in pair):
            return d
    return None


def fetch() -> Path:
    """Where the IDX files are, downloading Debian's package into the cache on first use."""
    found = data_dir()
    if found is not None:
        return found
    target = cache_location()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise CaspError(f"Fashion-MNIST is needed: install Debian's {PACKAGE} (apt-get install {PACKAGE}); "
                            f"downloading it failed: {e}") from None
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise CaspError(f"apt-get download {PACKAGE} gave no .deb file")
        unpack_deb(debs[0], target)
    return target


def unpack_deb(deb: Path, target: Path) -> None:
    """Copy the IDX files out of a .deb (ar archive → data.tar.* → usr/share/datasets/fashion-mnist/)."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CaspError(f"{deb} is not a Debian package")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size)
            f.read(size % 2)
            if name.startswith("data.tar"):
                with tempfile.NamedTemporaryFile(suffix=name) as tar_file:
                    tar_file.write(body)
                    tar_file.flush()
                    with tarfile.open(tar_file.name) as tar:
                        for pair in FILES.values():
                            for fname in pair:
                                src = tar.extractfile(_MEMBER_PREFIX + fname)
                                partial = target / f".{fname}.part"
                                partial.write_bytes(src.read())
                                partial.replace(target / fname)
                return
    raise CaspError(f"{deb} holds no data archive")


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def _file_pair(kind: str) -> tuple[np.ndarray, np.ndarray]:
    d = fetch()
    images, labels = (_idx(d / f) for f in FILES[kind])
    return images, labels


def images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, 28, 28], labels [n]) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    if split == "test":
        return _file_pair("test")
    x, y = _file_pair("train")
    part = slice(0, TRAIN_SIZE) if split == "train" else slice(TRAIN_SIZE, None)
    return x[part], y[part]
