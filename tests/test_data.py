import gzip
import struct

import numpy as np
import pytest

import carprune as cp
from carprune.data import balanced_split, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_idx_raw_and_gzip_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw").write_bytes(idx_bytes(images))
    (tmp_path / "gz").write_bytes(gzip.compress(idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "raw"), images)
    assert np.array_equal(read_idx(tmp_path / "gz"), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "labels").write_bytes(idx_bytes(labels))
    assert read_idx(tmp_path / "labels").tolist() == [3, 1, 4]


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b"\x01\x02" + b[2:], "magic"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:6], "truncated"),
    (lambda b: gzip.compress(b)[:-9], "gzip"),
])
def test_bad_idx_files_get_one_clear_sentence(tmp_path, mutate, words):
    path = tmp_path / "bad"
    path.write_bytes(mutate(idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))))
    with pytest.raises(cp.CarpruneError, match=words):
        read_idx(path)


def test_missing_file_names_file_and_fix(tmp_path):
    with pytest.raises(cp.CarpruneError, match="does not exist.*--data-dir"):
        cp.data.fashion_mnist(tmp_path)


def test_balanced_split_is_disjoint_complete_balanced_and_seeded():
    labels = np.repeat(np.arange(4), 25)[np.random.default_rng(3).permutation(100)]
    rest, held = balanced_split(labels, 5, seed=7)
    assert len(set(rest) & set(held)) == 0
    assert sorted(np.concatenate([rest, held])) == list(range(100))
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    again = balanced_split(labels, 5, seed=7)[1]
    assert np.array_equal(held, again)
    assert not np.array_equal(held, balanced_split(labels, 5, seed=8)[1])


def test_fashion_mnist_splits(fmnist):
    assert len(fmnist.train) == 55_000 and len(fmnist.val) == 5_000 and len(fmnist.test) == 10_000
    assert np.bincount(fmnist.val.tensors[1].numpy()).tolist() == [500] * 10
    assert fmnist.input_shape == (1, 28, 28)
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.classes[9] == "Ankle boot"
    # val images come from the official train set and are not in our train split
    train_rows = {row.tobytes() for row in fmnist.train.tensors[0][:, 0].numpy()}
    assert not any(row.tobytes() in train_rows for row in fmnist.val.tensors[0][:200, 0].numpy())
    # normalised with the stated statistics: train mean ~0, std ~1
    x = fmnist.train.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 20), colour).save(tmp_path / cls / f"{i}.png")
    data = cp.data.image_folder(tmp_path, cp.data.preprocess_for(None, 16), workers=0)
    assert data.classes == ["blue", "red"]
    assert data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 20
    red = next(x for x, y in (data.val[i] for i in range(len(data.val))) if y == 1)
    assert red.shape == (3, 16, 16)
    assert red[0].mean() > red[2].mean()  # the red channel is the bright one


def test_image_folder_errors(tmp_path):
    with pytest.raises(cp.CarpruneError, match="does not exist"):
        cp.data.image_folder(tmp_path / "nope")
    (tmp_path / "cls").mkdir()
    with pytest.raises(cp.CarpruneError, match="no .png"):
        cp.data.image_folder(tmp_path)
    (tmp_path / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(cp.CarpruneError, match="cannot be read"):
        cp.data.image_folder(tmp_path)
