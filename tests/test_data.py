import functools
import io
import operator

import numpy as np
import pytest
import torch
from PIL import Image

import vqlab
from vqlab import data
from vqlab.config import DataConfig
from vqlab.schema import ConfigError


def photos(**options):
    return data.build_datasets(DataConfig(name="photos", val_count=64, train_count=100, **options), seed=0)


def test_photo_splits_are_disjoint_and_cover_the_bundled_photos():
    train = {data.photo_path(*p) for p in data.TRAIN_PHOTOS}
    val = {data.photo_path(*p) for p in data.VAL_PHOTOS}
    assert not train & val
    assert all(p.is_file() for p in train | val)
    assert len(train | val) == len(data.TRAIN_PHOTOS) + len(data.VAL_PHOTOS)


def test_no_validation_crop_occurs_in_a_training_photo():
    splits = photos(image_size=16)
    train_photos = [data.to_unit_range(data.load_photo(*p)) for p in data.TRAIN_PHOTOS]
    for index in (0, 31, 63):
        crop = splits.val[index]
        for photo in train_photos:
            # candidates: positions whose top-left pixel matches; then compare whole windows there
            corner = (photo == crop[:, :1, :1]).all(0)[: photo.shape[1] - 15, : photo.shape[2] - 15]
            for top, left in corner.nonzero().tolist():
                assert not torch.equal(photo[:, top : top + 16, left : left + 16], crop)


def test_images_are_in_range_with_the_configured_size():
    splits = photos(image_size=48)
    for image in (splits.train[0], splits.val[0]):
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    assert len(splits.val) == 64 and len(splits.train) == 100


def test_training_crops_depend_only_on_seed_epoch_and_index():
    a, b = photos().train, photos().train
    assert torch.equal(a[5], b[5])
    other_seed = data.build_datasets(DataConfig(name="photos", val_count=64, train_count=100), seed=1).train
    assert not torch.equal(a[5], other_seed[5])
    epoch_1 = 5 + len(a)  # the sampler's key for index 5 of epoch 1
    assert not torch.equal(a[5], b[epoch_1])
    assert torch.equal(a[epoch_1], b[epoch_1])


def test_validation_grid_is_fixed():
    a, b = photos().val, photos().val
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))


def test_too_many_validation_crops_is_a_clear_error():
    with pytest.raises(ValueError, match="val_count"):
        data.build_datasets(DataConfig(name="photos", image_size=256, val_count=500), seed=0)


def test_large_crops_skip_photos_that_are_too_small():
    splits = data.build_datasets(DataConfig(name="photos", image_size=256, val_count=4, train_count=4), seed=0)
    assert all(min(p.shape[1:]) >= 256 for p in splits.train.photos)
    assert splits.train[0].shape == (3, 256, 256)


def test_shapes_are_reproducible_and_splits_differ():
    splits = data.build_datasets(DataConfig(name="shapes", val_count=8, train_count=8), seed=0)
    again = data.build_datasets(DataConfig(name="shapes", val_count=8, train_count=8), seed=0)
    assert torch.equal(splits.train[3], again.train[3])
    assert not torch.equal(splits.train[3], splits.val[3])
    assert splits.train[0].shape == (3, 32, 32)


def test_imagefolder_resizes_crops_and_holds_out_validation(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    splits = data.build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, val_count=2), seed=0)
    assert len(splits.train) == 4 and len(splits.val) == 2
    assert not set(splits.train.files) & set(splits.val.files)
    assert splits.train[0].shape == (3, 32, 32)
    with_val = data.build_datasets(
        DataConfig(name="imagefolder", root=str(tmp_path), val_root=str(tmp_path / "class0"), val_count=1), seed=0
    )
    assert len(with_val.val) == 3 and len(with_val.train) == 6


def test_missing_image_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        data.build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), seed=0)


@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_the_expected_folder(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / folder)):
        data.build_datasets(DataConfig(name=name, root=str(tmp_path)), seed=0)


def test_validation_shards_cover_every_sample_once():
    shards = [list(data.ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(functools.reduce(operator.iadd, shards, [])) == list(range(10))


def test_training_loader_reshuffles_each_epoch():
    cfg = DataConfig(name="shapes", train_count=16, batch_size=4)
    dataset = data.Shapes(32, 16, seed=0, split=data.TRAIN)
    loader = data.train_loader(dataset, cfg, seed=0)
    data.set_epoch(loader, 0)
    first = [b.clone() for b in loader]
    data.set_epoch(loader, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, loader, strict=True))
    data.set_epoch(loader, 1)
    assert not torch.equal(first[0], next(iter(loader)))


def test_training_loader_can_start_mid_epoch():
    cfg = DataConfig(name="shapes", train_count=16, batch_size=4)
    loader = data.train_loader(data.Shapes(32, 16, seed=0, split=data.TRAIN), cfg, seed=0)
    data.set_epoch(loader, 2)
    whole = [b.clone() for b in loader]
    data.set_epoch(loader, 2, skip_batches=1)
    resumed = list(loader)
    assert len(resumed) == len(whole) - 1
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], resumed, strict=True))


def test_imagefolder_flips_depend_only_on_seed_epoch_and_index(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    make = lambda: data.build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), val_count=1), seed=0).train  # noqa: E731
    a, b = make(), make()
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    plain = data.ImageFiles(a.files, 32, flip=False)
    flipped = [torch.equal(a[i], plain[i].flip(-1)) for i in range(len(a))]
    assert any(flipped) and not all(flipped)


def test_synthetic_images_are_smooth_reproducible_and_in_range():
    splits = data.build_datasets(DataConfig(name="synthetic", image_size=64, val_count=4, train_count=8), seed=0)
    again = data.build_datasets(DataConfig(name="synthetic", image_size=64, val_count=4, train_count=8), seed=0)
    image = splits.train[2]
    assert image.shape == (3, 64, 64) and image.min() >= -1 and image.max() <= 1
    assert torch.equal(image, again.train[2]) and not torch.equal(image, splits.train[3])
    assert not torch.equal(splits.train[0], splits.val[0])
    assert (image[:, :, 1:] - image[:, :, :-1]).abs().mean() < 0.1 * image.std()  # smooth, not white noise


def test_persistent_workers_still_see_new_epochs():
    cfg = DataConfig(name="synthetic", train_count=8, batch_size=4, num_workers=2)
    dataset = data.Synthetic(16, 8, seed=0, split=data.TRAIN)
    loader = data.train_loader(dataset, cfg, seed=0)
    assert loader.persistent_workers
    epochs = []
    for epoch in range(2):
        data.set_epoch(loader, epoch)
        epochs.append(torch.cat(list(loader)))
    single = data.train_loader(dataset, DataConfig(name="synthetic", train_count=8, batch_size=4), seed=0)
    data.set_epoch(single, 1)
    assert torch.equal(epochs[1], torch.cat(list(single)))
    assert not torch.equal(epochs[0], epochs[1])


def image_folder(root, count, bad=None):
    """``count`` PNGs in ``root``; ``bad`` maps an index to the bytes written instead of an image."""
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"{i:02d}.png"
        if bad and i in bad:
            path.write_bytes(bad[i])
        else:
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)
    return root


def png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((36, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("content", [b"not an image", b"", png_bytes()[:60]], ids=["junk", "empty", "truncated"])
def test_an_unreadable_image_names_its_file(tmp_path, content):
    root = image_folder(tmp_path / "images", 3, {1: content})
    dataset = data.ImageFiles(data.image_files(root), 32, flip=False)
    assert dataset[0].shape == (3, 32, 32)
    with pytest.raises(data.DataError, match=str(root / "01.png")):
        dataset[1]


def test_an_image_folder_that_is_a_file_says_so(tmp_path):
    (tmp_path / "images").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'images'} is a file, not a folder"):
        data.image_files(tmp_path / "images")


def imagefolder_loaders(root, **options):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32, batch_size=4, val_batch_size=2, **options)
    splits = data.build_datasets(cfg, seed=0)
    return data.train_loader(splits.train, cfg, seed=0), data.val_loader(splits.val, cfg)


def test_first_batch_check_names_an_unreadable_file(tmp_path):
    root = image_folder(tmp_path / "images", 8, dict.fromkeys(range(8), b"junk"))
    with pytest.raises(data.DataError, match=f"cannot read image {root}"):
        data.check_first_batches(*imagefolder_loaders(root, val_count=2))
    val_only = image_folder(tmp_path / "val", 2, {0: b"junk"})
    good = image_folder(tmp_path / "good", 8)
    with pytest.raises(data.DataError, match=str(val_only / "00.png")):
        data.check_first_batches(*imagefolder_loaders(good, val_root=str(val_only)))
    data.check_first_batches(*imagefolder_loaders(good, val_count=2))


class Recorded(torch.utils.data.Dataset):
    def __init__(self, length):
        self.length, self.read = length, []

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        self.read.append(key)
        return torch.tensor(float(key))


def test_first_batch_check_reads_exactly_each_loaders_first_batch():
    cfg = DataConfig(name="synthetic", batch_size=4, val_batch_size=3)
    train_set, val_set = Recorded(20), Recorded(10)
    train, val = data.train_loader(train_set, cfg, seed=0), data.val_loader(val_set, cfg)
    data.set_epoch(train, 3, skip_batches=2)
    data.check_first_batches(train, val)
    checked = train_set.read, val_set.read
    train_set.read, val_set.read = [], []
    assert checked == (next(iter(train)).long().tolist(), next(iter(val)).long().tolist())
    assert len(checked[0]) == 4 and len(checked[1]) == 3


@pytest.mark.parametrize("name", ["photos", "synthetic"])
def test_batches_made_on_the_device_are_the_loaders_batches(name):
    """Same keys, same order, from a position part-way through an epoch; photos bit for bit,
    synthetic up to the rounding of a batched interpolation."""
    cfg = DataConfig(name=name, image_size=32, batch_size=6, train_count=30, val_count=4, on_device=True)
    loader = data.train_loader(data.build_datasets(cfg, seed=3).train, cfg, seed=3)
    data.set_epoch(loader, 1, 2)
    from_loader = list(loader)
    data.set_epoch(loader, 1, 2)
    made = list(data.device_batches(loader, torch.device("cpu")))
    assert len(made) == len(from_loader) == 3
    for a, b in zip(from_loader, made, strict=True):
        assert b.shape == (6, 3, 32, 32) and b.dtype == torch.float32
        if name == "photos":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["shapes", "imagefolder"])
def test_on_device_is_refused_for_data_decoded_on_the_cpu(name):
    with pytest.raises(ConfigError, match=rf"data\.on_device: .* {name} decodes on the CPU"):
        vqlab.config.load("smoke", {"data.name": name, "data.root": "/data", "data.on_device": True})


def gradient16():
    """An 8x8 16-bit ramp over the whole range, 0 to 65535."""
    return np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.fromarray(np.array([[0, 1] * 4] * 8, dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50])
    if transparent:
        image.info["transparency"] = 0
    return image


def halves(mode: str, left, right) -> Image.Image:
    """An 8x8 image of ``mode``: the left four columns ``left``, the right four ``right``."""
    image = Image.new(mode, (8, 8), right)
    image.paste(Image.new(mode, (4, 8), left), (0, 0))
    return image


def rgb_of(*columns):
    """(3, 8, 8) in [0, 255]: the left four columns of one colour and the right four of another."""
    left, right = (np.broadcast_to(np.asarray(c, dtype=np.float64), (8, 4, 3)) for c in columns)
    return np.concatenate([left, right], axis=1).transpose(2, 0, 1)


WHITE = (255, 255, 255)
ramp = gradient16().astype(np.float64) / 65535 * 255
# each mode PIL may give, as a file of that mode: (how to make it, suffix, what [0, 255] RGB it must read as)
MODES = {
    "L": (lambda: Image.new("L", (8, 8), 100), ".png", rgb_of((100,) * 3, (100,) * 3)),
    "1": (lambda: halves("1", 1, 0), ".png", rgb_of(WHITE, (0, 0, 0))),
    "RGB": (lambda: Image.new("RGB", (8, 8), (10, 200, 30)), ".png", rgb_of((10, 200, 30), (10, 200, 30))),
    "P": (lambda: palette_image(False), ".png", None),  # expected: palette_expected
    "P transparent": (lambda: palette_image(True), ".png", None),
    "I;16": (lambda: Image.fromarray(gradient16()), ".png", np.stack([ramp] * 3)),
    "I;16 tiff": (lambda: Image.fromarray(gradient16()), ".tif", np.stack([ramp] * 3)),
    "I": (lambda: Image.fromarray(gradient16().astype(np.int32)), ".tif", np.stack([ramp] * 3)),
    "CMYK": (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ".tif", rgb_of((255, 0, 0), (255, 0, 0))),
    # alpha: composited over white, so a transparent pixel is white whatever colour it holds
    "LA": (lambda: halves("LA", (100, 255), (0, 0)), ".png", rgb_of((100,) * 3, WHITE)),
    "RGBA": (lambda: halves("RGBA", (200, 0, 0, 255), (0, 0, 0, 0)), ".png", rgb_of((200, 0, 0), WHITE)),
    "RGBA half": (
        lambda: Image.new("RGBA", (8, 8), (200, 0, 0, 51)),  # 20% opaque over white
        ".png",
        rgb_of((0.2 * 200 + 0.8 * 255, 0.8 * 255, 0.8 * 255), (0.2 * 200 + 0.8 * 255, 0.8 * 255, 0.8 * 255)),
    ),
}


def palette_expected(transparent: bool):
    """Palette index 0 on even columns (transparent: white), 1 on odd ones."""
    first = WHITE if transparent else (10, 20, 30)
    return np.where(np.arange(8) % 2 == 0, rgb_of(first, first), rgb_of((200, 100, 50), (200, 100, 50)))


@pytest.mark.parametrize("case", list(MODES))
def test_every_image_mode_is_read_as_rgb_in_the_unit_range(tmp_path, case):
    make, suffix, expected = MODES[case]
    if case.startswith("P"):
        expected = palette_expected(transparent=case == "P transparent")
    image = make()
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == case.split()[0]  # the file really is of that mode
    read = data.ImageFiles([path], 8, flip=False)[0]
    assert read.dtype == torch.float32 and read.shape == (3, 8, 8)
    assert read.min() >= -1 and read.max() <= 1
    torch.testing.assert_close(read, torch.from_numpy(expected / 127.5 - 1).float(), atol=1.5 / 127.5, rtol=0)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: Image.fromarray(gradient16().astype(np.float32) / 65535), "mode F"),
        (lambda: Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)), "70000"),
        (lambda: Image.fromarray(np.full((8, 8), -1, dtype=np.int32)), "-1"),
    ],
    ids=["float", "above 16 bits", "negative"],
)
def test_images_whose_value_range_is_unknown_are_refused_naming_the_file(tmp_path, make, named):
    path = tmp_path / "image.tif"
    make().save(path)
    with pytest.raises(data.DataError, match=f"cannot read image {path}: .*{named}"):
        data.ImageFiles([path], 8, flip=False)[0]


def test_a_float_image_is_refused_when_the_datasets_are_built(tmp_path):
    image_folder(tmp_path, 4)
    Image.fromarray(np.zeros((36, 40), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(data.DataError, match=f"cannot read image {tmp_path / 'float.tif'}: 32-bit float"):
        data.build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), val_count=1), seed=0)


def corrupt_png():
    """A PNG whose image data has one byte changed: its header opens, its checksum does not match."""
    content = bytearray(png_bytes())
    start = content.index(b"IDAT") + 8
    content[start] ^= 0xFF
    return bytes(content)


BAD_FILES = {
    "corrupt": corrupt_png,
    "zero-byte": lambda: b"",
    "truncated": lambda: png_bytes()[: len(png_bytes()) // 2],
    "text named .png": lambda: b"a text file, not an image\n",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_anywhere_in_the_folder_stops_the_run_before_it_writes(tmp_path, kind):
    """Not only the first batches: every file's header is checked when the datasets are built."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    images = image_folder(tmp_path / "images", 40, {33: BAD_FILES[kind]()})
    root = tmp_path / "runs"
    argv = ["--config", "smoke", "data.name=imagefolder", f"data.root={images}", "data.val_count=4"]
    argv += ["data.batch_size=4", "data.val_batch_size=4", "train.steps=12", "optim.warmup_steps=0"]
    argv += [f"tracking.root={root}", "tracking.mlflow=true", "tracking.run_name=r"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "vqlab.train", *argv], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: cannot read image {images / '33.png'}: ")
    assert done.stderr.count("\n") == 1
    assert not root.exists() or list(root.iterdir()) == []  # no run folder, no MLflow store nor run
