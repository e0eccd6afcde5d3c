"""Fashion-MNIST from its Debian package, and the pictures and questions of the built-in fashion-vlm."""
import gzip
import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from casp.data import fashion_mnist, fashion_scenes
from casp.errors import CaspError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _deb(path, files: dict[str, bytes]):
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./usr/share/datasets/fashion-mnist/" + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))

    def member(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    path.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.xz", b"x")
                     + member("data.tar.xz", tar_bytes.getvalue()))


def test_the_idx_files_come_out_of_a_debian_package(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (7, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 7),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 3)}
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    _deb(deb, {name: _idx(a) for name, a in arrays.items()})
    out = tmp_path / "out"
    out.mkdir()
    fashion_mnist.unpack_deb(deb, out)
    for name, a in arrays.items():
        np.testing.assert_array_equal(fashion_mnist._idx(out / name), a)


def test_a_file_that_is_not_a_debian_package_is_one_line(tmp_path):
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"not an archive")
    with pytest.raises(CaspError, match="is not a Debian package"):
        fashion_mnist.unpack_deb(bad, tmp_path)


def test_the_three_splits_never_share_a_photo():
    sizes = {s: len(fashion_mnist.images(s)[0]) for s in fashion_mnist.SPLITS}
    assert sizes == {"train": 55_000, "validation": 5_000, "test": 10_000}
    train, validation = fashion_mnist.images("train")[0], fashion_mnist.images("validation")[0]
    assert not np.shares_memory(train, validation)
    labels = fashion_mnist.images("test")[1]
    assert Counter(labels.tolist()) == {k: 1000 for k in range(10)}   # the test file's own balance


def test_panels_and_answers_follow_from_the_split_photos():
    recs = fashion_scenes.records("test", 60, seed=3)
    again = fashion_scenes.records("test", 60, seed=3)
    photos, classes = fashion_mnist.images("test")
    for r, s in zip(recs, again):
        assert (r["question"], r["answer"], r["cells"]) == (s["question"], s["answer"], s["cells"])
        for a, b in zip(r["image"], s["image"]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["type"] for r in recs[:3]] == list(fashion_scenes.TYPES)
    for r in recs:
        assert len(r["image"]) == fashion_scenes.CELLS and any(c is not None for c in r["cells"])
        assert r["labels"] == [None if c is None else int(classes[c]) for c in r["cells"]]
        names = [None if k is None else fashion_mnist.CLASSES[k] for k in r["labels"]]
        if r["type"] == "position":
            where = next(i for i, p in enumerate(fashion_scenes.POSITIONS) if r["question"].endswith(f"the {p}?"))
            assert r["answer"] == (names[where] or "nothing")
        else:
            name = next(n for n in fashion_mnist.CLASSES if f" {n}" in r["question"])
            if r["type"] == "presence":
                assert r["answer"] == ("yes" if name in names else "no")
            else:
                assert names.count(name) == 1 and r["answer"] == fashion_scenes.POSITIONS[names.index(name)]
        for image, cell in zip(r["image"], r["cells"]):
            pixels = np.asarray(image)
            assert pixels.shape == (96, 96, 3)
            if cell is None:
                assert not pixels.any()
            else:
                small = np.asarray(image.convert("L").resize((28, 28), 2), np.float32)
                assert np.abs(small - photos[cell]).mean() < 20   # the cell is that photo, upscaled
    other = fashion_scenes.records("test", 5, seed=4)
    assert [r["cells"] for r in other] != [r["cells"] for r in recs[:5]]


def test_answers_are_spread_over_their_kinds():
    recs = fashion_scenes.records("validation", 300)
    by_type = {t: Counter(r["answer"] for r in recs if r["type"] == t) for t in fashion_scenes.TYPES}
    assert 0.3 < by_type["presence"]["yes"] / 100 < 0.7
    assert len(by_type["position"]) >= 8 and by_type["position"]["nothing"] < 40
    assert set(by_type["where"]) == set(fashion_scenes.POSITIONS) and max(by_type["where"].values()) < 40
