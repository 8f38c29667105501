"""Datasets. Every one yields ``(3, S, S)`` float32 images in [-1, 1] and nothing else.

- ``photos`` (the embedded default): random crops with flips from the RGB photos that ship inside
  scikit-image, scikit-learn and matplotlib; validation is a fixed grid of crops from photos that
  are never used for training.
- ``shapes``: procedural images from ``skimage.draw.random_shapes`` (for tests).
- ``synthetic``: smooth random colour fields made with torch alone (for throughput benchmarks).
- ``imagefolder``: any folder tree of images (e.g. ImageNet), resized and center-cropped.
- ``cifar10`` / ``cifar100``: torchvision's loaders on files already on disk.

``photos`` and ``synthetic`` can also make their training batches on the training device
(``data.on_device``), so that no loader worker or image copy stands between the device and its
next step: the same samples, from the same keys.

Randomness is explicit: a training sample depends only on ``(seed, epoch, index)``. The training
sampler hands datasets the key ``epoch * len(dataset) + index`` (``split_key`` undoes it), so
datasets hold no epoch state and loader workers can persist across epochs.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vqlab import distributed
from vqlab.config import DataConfig
from vqlab.errors import MissingFileError, UserError

# (package, path inside the package) of each photo; the stereo pair stays on one side of the split.
TRAIN_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
)
VAL_PHOTOS = (
    ("skimage", "data/coffee.png"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
# Held out of training when ``data.tuning`` is set: recipes are tuned on their crops, not on VAL_PHOTOS'.
TUNING_PHOTOS = (("skimage", "data/chelsea.png"), ("skimage", "data/rocket.jpg"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TRAIN, VAL = 0, 1


class DataError(UserError, ValueError):
    """The data cannot give what the config asks: too few images, an image that does not decode."""


def photo_path(package: str, relative: str) -> Path:
    """Where ``package`` keeps a bundled file, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the photos dataset reads files shipped with {package}; install it (pip install -e .)"
        )
    return Path(spec.submodule_search_locations[0]) / relative


def load_photo(package: str, relative: str) -> torch.Tensor:
    """One bundled photo as a ``(3, H, W)`` uint8 tensor."""
    from PIL import Image

    path = photo_path(package, relative)
    if not path.is_file():
        raise MissingFileError(f"bundled photo {path} is missing; reinstall {package}")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 255] (uint8, or float from a 16-bit image) -> float32 [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def split_key(key: int, length: int) -> tuple[int, int]:
    """A sampler key -> ``(epoch, index)``; validation keys are plain indices (epoch 0)."""
    return divmod(key, length)


def sample_rng(seed: int, split: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, epoch, index]))


class PhotoCrops(Dataset):
    """``count`` random ``size``-pixel crops per epoch. Photos are drawn uniformly, not by area,
    so the two largest (a retina and a deep-field sky, both mostly dark) do not dominate."""

    def __init__(self, photos: list[torch.Tensor], size: int, count: int, seed: int, flip: bool):
        photos = [p for p in photos if min(p.shape[1:]) >= size]
        if not photos:
            raise DataError(f"data.image_size={size} is larger than every training photo")
        self.photos, self.size, self.count, self.seed, self.flip = photos, size, count, seed, flip
        self.on_device: dict[torch.device, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.count

    def crop(self, key: int) -> tuple[int, int, int, bool]:
        """Where sample ``key`` comes from: ``(photo, top, left, flipped)``."""
        rng = sample_rng(self.seed, TRAIN, *split_key(key, self.count))
        photo = int(rng.integers(len(self.photos)))
        top = int(rng.integers(self.photos[photo].shape[1] - self.size + 1))
        left = int(rng.integers(self.photos[photo].shape[2] - self.size + 1))
        return photo, top, left, bool(self.flip and rng.random() < 0.5)

    def cut(self, photos: list[torch.Tensor], key: int) -> torch.Tensor:
        photo, top, left, flipped = self.crop(key)
        crop = photos[photo][:, top : top + self.size, left : left + self.size]
        return crop.flip(-1) if flipped else crop

    def __getitem__(self, key: int) -> torch.Tensor:
        return to_unit_range(self.cut(self.photos, key))

    def batch(self, keys: list[int], device: torch.device) -> torch.Tensor:
        """``torch.stack([self[k] for k in keys])``, cut on ``device`` from photos kept there."""
        if device not in self.on_device:
            self.on_device[device] = [p.to(device) for p in self.photos]
        return to_unit_range(torch.stack([self.cut(self.on_device[device], k) for k in keys]))


class GridCrops(Dataset):
    """A fixed, evenly spread subset of the half-overlapping grid of crops over some photos."""

    def __init__(self, photos: list[torch.Tensor], size: int, count: int):
        stride = max(size // 2, 1)
        grid = [
            (i, top, left)
            for i, photo in enumerate(photos)
            for top in range(0, photo.shape[1] - size + 1, stride)
            for left in range(0, photo.shape[2] - size + 1, stride)
        ]
        if count > len(grid):
            raise DataError(f"data.val_count={count} exceeds the {len(grid)} validation crops of size {size}")
        picks = np.linspace(0, len(grid) - 1, count).round().astype(int)
        self.photos, self.size, self.crops = photos, size, [grid[i] for i in picks]

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> torch.Tensor:
        i, top, left = self.crops[index]
        return to_unit_range(self.photos[i][:, top : top + self.size, left : left + self.size])


class Shapes(Dataset):
    """Procedural coloured shapes on white; each image depends only on (seed, split, epoch, index)."""

    def __init__(self, size: int, count: int, seed: int, split: int, flip: bool = False):
        self.size, self.count, self.seed, self.split, self.flip = size, count, seed, split, flip

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: int) -> torch.Tensor:
        from skimage.draw import random_shapes

        rng = sample_rng(self.seed, self.split, *split_key(key, self.count))
        image, _ = random_shapes(
            (self.size, self.size),
            max_shapes=4,
            min_shapes=1,
            min_size=max(self.size // 6, 2),
            channel_axis=-1,
            rng=rng,
        )
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)
        if self.flip and rng.random() < 0.5:
            tensor = tensor.flip(-1)
        return to_unit_range(tensor)


class Synthetic(Dataset):
    """Smooth random colour fields (two octaves of upsampled noise): dependency-free, nearly free
    to generate, for throughput benchmarks where real data would measure the loader instead."""

    def __init__(self, size: int, count: int, seed: int, split: int):
        self.size, self.count, self.seed, self.split = size, count, seed, split

    def __len__(self) -> int:
        return self.count

    def noise(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``key``'s two octaves of noise, ``(1, 3, 4, 4)`` and ``(1, 3, 16, 16)``."""
        seed = int(sample_rng(self.seed, self.split, *split_key(key, self.count)).integers(2**62))
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(1, 3, 4, 4, generator=generator) * 2 - 1
        fine = torch.rand(1, 3, 16, 16, generator=generator) * 0.5 - 0.25
        return coarse, fine

    def render(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        size = (self.size, self.size)
        image = F.interpolate(coarse, size, mode="bicubic", align_corners=False)
        return (image + F.interpolate(fine, size, mode="bilinear", align_corners=False)).clamp(-1, 1)

    def __getitem__(self, key: int) -> torch.Tensor:
        return self.render(*self.noise(key))[0]

    def batch(self, keys: list[int], device: torch.device) -> torch.Tensor:
        """``torch.stack([self[k] for k in keys])`` (up to the device's rounding), rendered on
        ``device`` from the keys' noise: 816 numbers per image cross to it, not the image."""
        coarse, fine = zip(*(self.noise(k) for k in keys), strict=True)
        return self.render(torch.cat(coarse).to(device), torch.cat(fine).to(device))


class Flipped(Dataset):
    """Horizontal flips drawn from ``(seed, epoch, index)`` rather than a loader's RNG, so a
    resumed run sees exactly the images the uninterrupted one would have."""

    def __init__(self, flip: bool, seed: int):
        self.flip, self.seed = flip, seed

    def maybe_flip(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if self.flip and sample_rng(self.seed, TRAIN, epoch, index).random() < 0.5:
            return image.flip(-1)
        return image


SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}  # PIL's 16-bit greyscale modes (a 16-bit PNG is one)
BACKGROUND = (255, 255, 255)  # what shows through a transparent pixel
FLOAT_MODE = "32-bit float image (mode F): its value range is unknown; save it as an 8-bit or 16-bit image"


def rgb_array(image) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` RGB on the [0, 255] scale: ``uint8`` from 8-bit modes,
    ``float32`` from 16-bit greyscale (``I;16*``, and ``I`` whose values fit in 16 bits), so their
    precision is kept and 65535 is white (PIL's own conversion clips them to 255: a 16-bit photo
    reads as almost white). An image with alpha (``RGBA``, ``LA``, ``PA``, a palette or colour key
    with transparency) is composited over white: a transparent pixel is white, whatever colour it
    holds. 32-bit float images (``F``) and ``I`` images beyond 0..65535 have no known value range
    and are a ``DataError``."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 65535:
            raise DataError(
                f"32-bit integer image (mode I) with values {low:.0f}..{high:.0f}, beyond 16 bits: "
                "its white is unknown; save it as an 8-bit or 16-bit image"
            )
        return np.repeat((values * (255 / 65535))[..., None], 3, axis=-1)
    if image.mode == "F":
        raise DataError(FLOAT_MODE)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


class ImageFiles(Flipped):
    """Image files -> RGB (``rgb_array``: any mode, 16-bit kept, alpha over white) -> resize (shorter
    side) + center crop, the upstream ImageNet recipe."""

    def __init__(self, files: list[Path], size: int, flip: bool, seed: int = 0):
        from torchvision.transforms import v2

        super().__init__(flip, seed)
        self.files = files
        self.transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int) -> torch.Tensor:
        from PIL import Image

        epoch, index = split_key(key, len(self.files))
        try:
            with Image.open(self.files[index]) as image:
                array = rgb_array(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises for bad files
            raise DataError(f"cannot read image {self.files[index]}: {err}") from None
        image = self.transform(torch.from_numpy(array.copy()).permute(2, 0, 1))
        return to_unit_range(self.maybe_flip(image, epoch, index))


class Unlabelled(Flipped):
    """Drops the labels of a torchvision dataset and maps its images to [-1, 1]."""

    def __init__(self, dataset: Dataset, size: int, flip: bool, seed: int = 0):
        from torchvision.transforms import v2

        super().__init__(flip, seed)
        self.dataset = dataset
        self.transform = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> torch.Tensor:
        epoch, index = split_key(key, len(self.dataset))
        image, _ = self.dataset[index]
        return to_unit_range(self.maybe_flip(self.transform(image), epoch, index))


def image_files(root: Path) -> list[Path]:
    if root.is_file():
        raise MissingFileError(f"image folder {root} is a file, not a folder")
    if not root.is_dir():
        raise MissingFileError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MissingFileError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


HEADER_CHECK_LIMIT = 100_000  # folders of up to this many files have every file's header checked


def check_headers(files: list[Path]) -> None:
    """Open every file as the loader will and ``verify`` it (PIL: the header, and for a PNG every
    chunk's checksum, without decoding), so that a file that is not an image, is empty, truncated or
    corrupt is a ``DataError`` naming it when the datasets are built, before a run writes anything,
    rather than when a loader reaches it mid-run. Folders of more than ``HEADER_CHECK_LIMIT`` files
    (ImageNet: 1.28M opens, often on a network file system) are not checked; the loader names a bad
    file there when it reaches it. A JPEG cut short after its header passes (PIL verifies no JPEG
    data without decoding it) and is named by the loader too. A mode ``rgb_array`` refuses
    whatever the values (``F``) is refused here too."""
    from PIL import Image

    if len(files) > HEADER_CHECK_LIMIT:
        return
    for path in files:
        try:
            with Image.open(path) as image:
                if image.mode == "F":
                    raise DataError(FLOAT_MODE)
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises
            raise DataError(f"cannot read image {path}: {' '.join(str(err).split())}") from None


def cifar(cfg: DataConfig, train: bool) -> Dataset:
    from torchvision import datasets

    cls, folder = (
        (datasets.CIFAR10, "cifar-10-batches-py") if cfg.name == "cifar10" else (datasets.CIFAR100, "cifar-100-python")
    )
    try:
        return cls(cfg.root, train=train, download=False)
    except RuntimeError:
        raise MissingFileError(
            f"{cfg.name} files not found: extract the python version of the dataset so that "
            f"{Path(cfg.root) / folder} exists (vqlab never downloads at run time)"
        ) from None


@dataclass
class Splits:
    train: Dataset
    val: Dataset


def build_datasets(cfg: DataConfig, seed: int) -> Splits:
    size = cfg.image_size
    if cfg.name == "photos":
        fit = [p for p in TRAIN_PHOTOS if p not in TUNING_PHOTOS] if cfg.tuning else TRAIN_PHOTOS
        train = PhotoCrops([load_photo(*p) for p in fit], size, cfg.train_count, seed, cfg.flip)
        held_out = TUNING_PHOTOS if cfg.tuning else VAL_PHOTOS
        return Splits(train, GridCrops([load_photo(*p) for p in held_out], size, cfg.val_count))
    if cfg.name == "synthetic":
        return Splits(Synthetic(size, cfg.train_count, seed, TRAIN), Synthetic(size, cfg.val_count, seed, VAL))
    if cfg.name == "shapes":
        return Splits(Shapes(size, cfg.train_count, seed, TRAIN, cfg.flip), Shapes(size, cfg.val_count, seed, VAL))
    if cfg.name == "imagefolder":
        files = image_files(Path(cfg.root))
        check_headers(files)
        if cfg.val_root:
            val_files = image_files(Path(cfg.val_root))
            check_headers(val_files)
        else:
            if cfg.val_count >= len(files):
                raise DataError(f"data.val_count={cfg.val_count} leaves no training images among {len(files)} files")
            order = np.random.default_rng(seed).permutation(len(files))
            val_files = [files[i] for i in sorted(order[: cfg.val_count])]
            files = [files[i] for i in sorted(order[cfg.val_count :])]
        return Splits(ImageFiles(files, size, cfg.flip, seed), ImageFiles(val_files, size, flip=False))
    return Splits(Unlabelled(cifar(cfg, True), size, cfg.flip, seed), Unlabelled(cifar(cfg, False), size, flip=False))


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes indices ``r, r + w, ...``: every sample exactly once, no padding,
    so metrics summed over ranks are the whole set's."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding keys ``epoch * len(dataset) + index`` (see ``split_key``),
    and able to start an epoch part-way through, for exact resume."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + i for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return self.num_samples - self.skip


def train_loader(
    dataset: Dataset, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> DataLoader:
    """Shuffled, ``drop_last``; call ``set_epoch(loader, e)`` before iterating epoch ``e``.

    Every loader of vqlab has a generator of its own: a DataLoader draws a seed each time it makes
    an iterator, and from the global generator it would shift what the model draws (Gumbel noise,
    dropout) by the number of passes made, which differs between a run and its resumed self."""
    if len(dataset) < cfg.batch_size * world_size:
        raise DataError(
            f"{len(dataset)} training images cannot fill one batch of "
            f"data.batch_size={cfg.batch_size} x {world_size} ranks"
        )
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.num_workers > 0,
        generator=own_generator(seed),
    )


def val_loader(dataset: Dataset, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.val_batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=cfg.num_workers,
        generator=own_generator(0),
    )


def own_generator(seed: int) -> torch.Generator:
    """A loader's own generator (see ``train_loader``); the datasets draw from ``sample_rng``, so it
    only seeds the loader's workers."""
    return torch.Generator().manual_seed(seed)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Position ``loader`` at batch ``skip_batches`` of epoch ``epoch``."""
    loader.sampler.set_position(epoch, skip_batches * loader.batch_size)


def device_batches(loader: DataLoader, device: torch.device) -> Iterator[torch.Tensor]:
    """``data.on_device``: the loader's batches, made by its dataset on ``device`` from the keys
    its sampler yields (the same keys, in the same order, from the same position), without
    workers or host-to-device copies of images."""
    for keys in loader.batch_sampler:
        yield loader.dataset.batch(keys, device)


def check_first_batches(*loaders: DataLoader) -> None:
    """Read each loader's first batch, so that data which cannot be read at all (a wrong
    ``data.root``, files that are not images, no permission) is a ``DataError`` naming a file
    before a run writes anything, rather than at the first step after its folder exists. Call it
    on every rank (it gathers every rank's outcome, so all ranks raise or none does).

    Only the first batches: decoding every file of ImageNet (1.28M files, ~140 GB) at start would
    take longer than many runs. ``build_datasets`` has already checked every file's header in a
    folder of up to ``HEADER_CHECK_LIMIT`` files (``check_headers``); a file that passes it but
    does not decode, or a bad file in a larger folder, is reported with its path when a loader
    reaches it (``ImageFiles``). The keys are the ones the loader's own sampler yields at its current
    position, read through its dataset in this process: no worker start-up, and the error is the
    dataset's own rather than a worker's wrapper of it.
    """
    problem = None
    try:
        for loader in loaders:
            for key in next(iter(loader.batch_sampler), []):
                loader.dataset[key]
    except DataError as err:
        problem = str(err)
    problems = [(rank, text) for rank, text in enumerate(distributed.all_gather_objects(problem)) if text]
    if problems:
        rank, text = problems[0]
        raise DataError(f"rank {rank}: {text}" if distributed.world_size() > 1 else text)
