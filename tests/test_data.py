"""senet.data: every format on files written here in its real layout, every bad-data error, and
loaders whose batches are a pure function of (seed, epoch, step)."""

from __future__ import annotations

import io
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from senet.data import DataProblems, EpochBatchSampler, create_datasets, create_loaders, list_datasets
from senet.data import transforms as T
from senet.data.cifar import CIFAR_PAD

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return create_datasets("digits")


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_split_sizes_and_stratification(digits, sk_digits):
    assert (len(digits.train), len(digits.val)) == (1437, 360)  # 1,797 images, 80/20
    assert (digits.num_classes, digits.in_chans, digits.image_size) == (10, 1, 32)
    assert digits.classes == [str(i) for i in range(10)]
    total = np.bincount(sk_digits.target, minlength=10)
    val = np.bincount(digits.val.labels.numpy(), minlength=10)
    assert np.all(np.abs(val - 0.2 * total) <= 1)  # stratified: each class ~20% in val


def test_digits_split_is_deterministic_and_seeded(digits):
    again = create_datasets("digits")
    assert torch.equal(again.val.images, digits.val.images) and torch.equal(again.train.labels, digits.train.labels)
    other = create_datasets("digits", seed=1)
    assert not torch.equal(other.val.images, digits.val.images)
    assert len(create_datasets("digits", val_fraction=0.5).val) == 899  # ceil(1797 / 2), sklearn's rounding


def test_digits_normalisation_is_the_train_split_stats(sk_digits):
    # At the native 8x8 there is no resampling: recover which sklearn rows went to val by matching
    # pixels, then the train rows' mean/std (numpy, on v / 16) must be the bundle's normalisation.
    b = create_datasets("digits", image_size=8)
    raw = torch.stack([b.val[i][0] for i in range(len(b.val))]) * b.std[0] + b.mean[0]  # (360, 1, 8, 8)
    keys = {r.tobytes() for r in np.rint(raw.numpy() * 16).astype(np.int64).reshape(len(raw), -1)}
    rows = sk_digits.images.astype(np.int64).reshape(len(sk_digits.images), -1)
    in_val = np.array([r.tobytes() in keys for r in rows])
    assert in_val.sum() >= 360  # duplicated images may match twice
    train = sk_digits.images[~in_val] / 16.0
    assert b.mean[0] == pytest.approx(train.mean(), abs=1e-3)
    assert b.std[0] == pytest.approx(train.std(ddof=1), abs=1e-3)


def test_digits_upsampled_train_images_normalise_to_zero_mean_unit_std(digits):
    x = T.normalize(digits.train.images, digits.mean, digits.std)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4) and x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert digits.train.images.min() >= 0 and digits.train.images.max() <= 1


def test_digits_augmentation_is_a_shift_never_a_mirror(digits):
    ds = digits.train
    assert ds.pad == 4 and not ds.flip  # 4 px at 32 = 1 px of the 8x8 original
    for i, s in [(0, 11), (5, 12), (77, 13)]:
        x, _ = ds[(i, s)]
        match = _find_crop(ds.images[i], x * ds.std[0] + ds.mean[0], pad=4)  # undo normalisation
        assert match is not None and match[2] is False


# --------------------------------------------------------------------------- transforms


def _find_crop(original: torch.Tensor, out: torch.Tensor, pad: int):
    """(dy, dx, flipped) such that out == crop of the zero-padded original (by hand), else None."""
    C, H, W = original.shape
    padded = F.pad(original.float(), (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            for flipped, cand in ((False, crop), (True, crop.flip(-1))):
                if torch.allclose(cand, out.float(), atol=1e-5):
                    return dy, dx, flipped
    return None


def test_crop_flip_matches_pad_and_slice_by_hand():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    seeds = list(range(100, 106))
    out = T.crop_flip(images, seeds, pad=2, flip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(6):
        assert _find_crop(images[i], out[i], pad=2) is not None
        assert torch.equal(T.crop_flip(images[i:i + 1], seeds[i:i + 1], pad=2, flip=True)[0], out[i])  # per sample


def test_crop_flip_draws_every_offset_and_flips_half_the_time():
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) + 1  # unique, nonzero pixels
    found = [_find_crop(img[0], T.crop_flip(img, [s], pad=1, flip=True)[0], pad=1) for s in range(300)]
    assert {(dy, dx) for dy, dx, _ in found} == {(a, b) for a in range(3) for b in range(3)}
    assert 0.4 < np.mean([f for _, _, f in found]) < 0.6


def test_sample_seed_mixes_its_parts():
    assert T.sample_seed(0, 1, 5) != T.sample_seed(1, 0, 5)  # unlike seed + epoch
    assert T.sample_seed(3, 2, 1) == T.sample_seed(3, 2, 1) and 0 <= T.sample_seed(3, 2, 1) < 2**63


def test_imagenet_transforms_output_shapes_and_eval_resize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert T.imagenet_train_transform(64)(img).shape == (3, 64, 64)
    ev = T.imagenet_eval_transform(224)
    assert ev.transforms[0].size == 256 and ev(img).shape == (3, 224, 224)  # resize 256, center 224
    assert T.imagenet_eval_transform(32)(img).shape == (3, 32, 32)


def test_seeded_transform_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    tf = T.imagenet_train_transform(16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = T.seeded(tf, 7, img), T.seeded(tf, 7, img), T.seeded(tf, 8, img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- CIFAR


def _cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"training batch 1 of 5",
        label_key: rng.integers(0, num_classes, n).tolist(),  # python ints, as in the real files
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return d


def _dump(obj, path, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def cifar10_root(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _dump(_cifar_batch(4, 10, b"labels", i), d / f"data_batch_{i}")
    _dump(_cifar_batch(3, 10, b"labels", 9), d / "test_batch", protocol=pickle.HIGHEST_PROTOCOL)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": 4, b"num_vis": 3072}, d / "batches.meta")
    return tmp_path


def test_cifar10_round_trip(cifar10_root):
    b = create_datasets("cifar10", str(cifar10_root))
    src = [_cifar_batch(4, 10, b"labels", i) for i in range(1, 6)]
    data = np.concatenate([s[b"data"] for s in src])
    assert (b.num_classes, b.in_chans, b.image_size, len(b.train), len(b.val)) == (10, 3, 32, 20, 3)
    assert b.classes[0] == "airplane" and b.classes[9] == "truck"
    assert b.train.labels.tolist() == sum((s[b"labels"] for s in src), [])
    assert torch.equal(b.train.images, torch.from_numpy(data).view(20, 3, 32, 32))
    # channel planes: row = R (1024), G (1024), B (1024), each 32x32 row-major
    test = _cifar_batch(3, 10, b"labels", 9)
    x, y = b.val[1]
    raw = (x * torch.tensor(b.std).view(3, 1, 1) + torch.tensor(b.mean).view(3, 1, 1)) * 255
    assert y == test[b"labels"][1]
    assert torch.allclose(raw, torch.from_numpy(test[b"data"][1].astype(np.float32)).view(3, 32, 32), atol=1e-3)
    per_channel = data.reshape(20, 3, -1).transpose(1, 0, 2).reshape(3, -1) / 255.0  # (3, N * 1024)
    assert np.allclose(b.mean, per_channel.mean(1)) and np.allclose(b.std, per_channel.std(1, ddof=1))


def test_cifar10_training_batches_are_flipped_pad4_crops(cifar10_root):
    b = create_datasets("cifar10", str(cifar10_root))
    assert b.train.pad == CIFAR_PAD == 4 and b.train.flip
    x, _ = b.train[(2, 5)]
    raw = (x * torch.tensor(b.std).view(3, 1, 1) + torch.tensor(b.mean).view(3, 1, 1)) * 255
    assert _find_crop(b.train.images[2], raw.round(), pad=4) is not None


def test_cifar100_round_trip_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train, test = _cifar_batch(6, 100, b"fine_labels", 1), _cifar_batch(2, 100, b"fine_labels", 2)
    train[b"fine_labels"][0] = 99
    _dump(train, d / "train")
    _dump(test, d / "test")
    _dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, d / "meta")
    b = create_datasets("cifar100", str(d))  # the batches folder itself works too
    assert (b.num_classes, len(b.train), len(b.val)) == (100, 6, 2)
    assert b.train.labels.tolist() == train[b"fine_labels"] and b.classes[99] == "c99"
    assert torch.equal(b.val.images.flatten(1), torch.from_numpy(test[b"data"]))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_code(cifar10_root, tmp_path):
    marker = tmp_path / "pwned"
    batch = _cifar_batch(4, 10, b"labels", 1)
    batch[b"batch_label"] = _Evil(marker)
    _dump(batch, cifar10_root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to load global posix.system"):
        create_datasets("cifar10", str(cifar10_root))
    assert not marker.exists()


def test_cifar_label_out_of_range_names_the_file(cifar10_root):
    batch = _cifar_batch(4, 10, b"labels", 4)
    batch[b"labels"][2] = 10
    _dump(batch, cifar10_root / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(ValueError, match=r"data_batch_4: label 10 at row 2 is outside 0..9"):
        create_datasets("cifar10", str(cifar10_root))


def test_cifar_missing_batch_files(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_2"):
        create_datasets("cifar10", str(cifar10_root))


@pytest.mark.parametrize("make", ["missing", "empty", "wrong"])
def test_cifar_missing_or_wrong_directory(tmp_path, make):
    root = tmp_path / "c"
    if make != "missing":
        root.mkdir()
    if make == "wrong":
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "readme.html").write_text("x")
    with pytest.raises(FileNotFoundError, match=str(root)):
        create_datasets("cifar10", str(root))


def test_cifar_malformed_data_is_an_error(cifar10_root):
    batch = _cifar_batch(4, 10, b"labels", 1)
    batch[b"data"] = batch[b"data"][:, :100]
    _dump(batch, cifar10_root / "cifar-10-batches-py" / "data_batch_1")
    with pytest.raises(ValueError, match=r"data_batch_1: b'data' is uint8 \(4, 100\)"):
        create_datasets("cifar10", str(cifar10_root))


def test_cifar_download_without_internet_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="could not download CIFAR-10 .*copy the extracted cifar-10-batches-py"):
        create_datasets("cifar10", str(tmp_path), download=True)


# --------------------------------------------------------------------------- ImageFolder


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    """train: 3 cats (1 PNG, 1 JPEG, 1 grey PNG) + 2 dogs + a truncated JPEG + text named .jpg; val: 1 + 1."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    _save(root / "train/cat/a.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    _save(root / "train/cat/b.jpg", rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
    _save(root / "train/cat/c.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))  # mode L
    _save(root / "train/dog/d.jpeg", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    _save(root / "train/dog/e.png", rng.integers(0, 256, (18, 26, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train/dog/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "train/cat/notes.jpg").write_text("this is not an image")
    (root / "train/cat/README.txt").write_text("ignored: not an image extension")
    _save(root / "val/cat/v.png", np.full((40, 30, 3), (200, 100, 50), dtype=np.uint8))
    _save(root / "val/dog/w.png", np.full((20, 20, 3), (0, 255, 128), dtype=np.uint8))
    return root


def test_image_folder_scans_classes_and_streams(folder):
    b = create_datasets(f"imagefolder:{folder}", image_size=16)
    assert b.name == f"imagefolder:{folder}" and b.classes == ["cat", "dog"]
    assert (b.num_classes, b.in_chans, b.image_size, len(b.train), len(b.val)) == (2, 3, 16, 7, 2)
    assert not hasattr(b.train, "images")  # streamed: only paths are held
    assert create_datasets("imagefolder", str(folder)).image_size == 224


def test_image_folder_eval_pixels_are_normalised_rgb(folder):
    b = create_datasets(f"imagefolder:{folder}", image_size=8)
    x, y = b.val[0]  # a uniform (200, 100, 50) image: every pixel is (v / 255 - mean_c) / std_c
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    assert y == 0 and x.shape == (3, 8, 8)
    assert torch.allclose(x, want.view(3, 1, 1).expand(3, 8, 8), atol=1e-5)


def test_image_folder_skips_counts_and_reports_bad_files(folder):
    b = create_datasets(f"imagefolder:{folder}", image_size=8)
    train, _ = create_loaders(b, 3, workers=0, seed=0)
    for epoch in range(2):
        train.set_epoch(epoch)
        seen = sum(len(y) for _, y in train)
        assert seen == 5  # 7 files, 2 unreadable
    bad = {os.path.basename(p): r for p, r in b.problems.files.items()}
    assert set(bad) == {"truncated.jpg", "notes.jpg"}
    assert "truncated" in bad["truncated.jpg"] and "UnidentifiedImageError" in bad["notes.jpg"]
    assert len(b.problems) == 2 and b.problems.occurrences == 4  # each met once per epoch
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable file\(s\)[\s\S]*truncated.jpg"):
        text = b.problems.report()
    assert "notes.jpg" in text


def test_image_folder_batches_do_not_depend_on_workers(folder):
    b = create_datasets(f"imagefolder:{folder}", image_size=8)
    one = _epoch(create_loaders(b, 2, workers=0, seed=3).train, 1)
    two = _epoch(create_loaders(b, 2, workers=2, seed=3).train, 1)
    assert len(one) == len(two) == 3
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(b.problems) == 2  # recorded from worker processes too


def _bad_tree(tmp_path, case):
    root = tmp_path / "bad"
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    if case == "empty":
        root.mkdir()
    elif case == "images_in_root":
        _save(root / "a.png", img)
    elif case == "no_val":
        _save(root / "train/cat/a.png", img)
    elif case == "no_class_dirs":
        _save(root / "train/a.png", img)
        _save(root / "val/cat/a.png", img)
    elif case == "empty_class":
        _save(root / "train/cat/a.png", img)
        (root / "train/dog").mkdir()
        _save(root / "val/cat/a.png", img)
    elif case == "val_unknown_class":
        _save(root / "train/cat/a.png", img)
        _save(root / "val/cow/a.png", img)
    return root


@pytest.mark.parametrize(("case", "error", "match"), [
    ("missing", FileNotFoundError, "no directory .*bad: pass the folder holding train/<class>/"),
    ("empty", FileNotFoundError, "bad is empty; put images in"),
    ("images_in_root", ValueError, "no train/ or val/ folder; 1 images lie directly in"),
    ("no_val", ValueError, "has no val/ folder"),
    ("no_class_dirs", ValueError, "train has 1 images but no class folders"),
    ("empty_class", ValueError, "dog holds no images"),
    ("val_unknown_class", ValueError, r"classes not in train/: \['cow'\]"),
])
def test_image_folder_bad_layouts(tmp_path, case, error, match):
    root = _bad_tree(tmp_path, case)
    with pytest.raises(error, match=match):
        create_datasets(f"imagefolder:{root}")


# --------------------------------------------------------------------------- names, loaders


def test_unknown_name_and_missing_path():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'; choose one of .*digits.*cifar10"):
        create_datasets("mnist")
    with pytest.raises(ValueError, match="imagefolder needs a path"):
        create_datasets("imagefolder")
    with pytest.raises(FileNotFoundError, match="no directory at '/no/such/tree'; give an ImageFolder tree"):
        create_datasets("/no/such/tree")
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        create_datasets("digits", val_fraction=1.5)
    assert "digits" in list_datasets()


def _epoch(loader, epoch, start_step=0):
    loader.set_epoch(epoch, start_step)
    return list(loader)


def test_loader_epoch_is_a_shuffled_permutation_fixed_by_seed_and_epoch(digits):
    train, val = create_loaders(digits, 128, workers=0, seed=0)
    assert len(train) == 12 and len(val) == 3  # ceil(1437 / 128), ceil(360 / 128)
    s = train.batch_sampler
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (1, 0)]:
        s.seed = seed
        s.set_epoch(epoch)
        orders[seed, epoch] = s.indices()
        assert sorted(orders[seed, epoch]) == list(range(1437))
    assert len({tuple(o) for o in orders.values()}) == 3
    x, y = next(iter(val))
    assert torch.equal(x, digits.val.batch(list(range(128))).images) and torch.equal(y, digits.val.labels[:128])


def test_in_memory_data_sets_work_with_a_plain_dataloader(digits):
    x, y = next(iter(torch.utils.data.DataLoader(digits.val, batch_size=16)))  # default collate
    assert x.shape == (16, 1, 32, 32) and torch.equal(y, digits.val.labels[:16])
    assert torch.equal(x[3], digits.val[3][0])


def test_loader_resume_mid_epoch_is_bit_identical(digits):
    train, _ = create_loaders(digits, 128, workers=0, seed=5)
    torch.manual_seed(0)
    full = _epoch(train, 2)
    torch.manual_seed(999)  # the model's own RNG use must not matter
    state = torch.get_rng_state()
    resumed = _epoch(create_loaders(digits, 128, workers=0, seed=5).train, 2, start_step=7)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor is it changed by loading
    assert len(resumed) == len(full) - 7
    for (xa, ya), (xb, yb) in zip(full[7:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(full[0][0], _epoch(train, 3)[0][0])  # a new epoch: new order and crops


def test_distributed_shards_cover_the_epoch():
    n, bs = 23, 4
    train = [EpochBatchSampler(n, bs, shuffle=True, seed=1, num_replicas=2, rank=r) for r in range(2)]
    val = [EpochBatchSampler(n, bs, shuffle=False, num_replicas=2, rank=r) for r in range(2)]
    for s in train + val:
        s.set_epoch(4)
    assert len(train[0]) == len(train[1]) == 3  # 12 samples each (one padded): DDP ranks step together
    seen = [i for s in train for batch in s for i, _ in batch]
    assert len(seen) == 24 and set(seen) == set(range(n))
    val_seen = sorted(i for s in val for batch in s for i, _ in batch)
    assert val_seen == list(range(n))  # no padding: nothing scored twice
    ref = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=1, shuffle=True,
                                              seed=T.mix_seed(1))
    ref.set_epoch(4)
    assert train[1].indices() == list(ref)


def test_loader_argument_errors(digits):
    with pytest.raises(ValueError, match="distributed=True needs an initialised process group"):
        create_loaders(digits, 8, workers=0, distributed=True)
    with pytest.raises(ValueError, match="batch_size=0"):
        create_loaders(digits, 0, workers=0)
    with pytest.raises(ValueError, match="workers=-1"):
        create_loaders(digits, 8, workers=-1)
    train, _ = create_loaders(digits, 128, workers=0)
    with pytest.raises(ValueError, match="start_step=13 is outside 0..12"):
        train.set_epoch(0, start_step=13)


def test_problems_summary_limits_and_records():
    p = DataProblems()
    assert not p and p.summary() == ""
    for i in range(12):
        p.add(f"/d/{i}.jpg", "OSError: truncated")
    p.add("/d/0.jpg", "OSError: truncated")
    text = p.summary(limit=3)
    assert text.count("\n") == 4 and "... and 9 more" in text and "13 time(s)" in text
    assert p.as_dict()["skipped_files"] == 12
