"""ImageNet's crops: random-resized-crop + flip for training, resize + center crop for evaluation.

Both follow torchvision's transforms on PIL images (`RandomResizedCrop`,
`RandomHorizontalFlip`, `Resize`, `CenterCrop`), bilinear, antialiased as
Pillow's resampling is, and give uint8 arrays [size, size, 3]. The random
choices of one example come from `example_rng(seed, epoch, source, index)`,
so that a batch is a function of the run's seed and the step, and a resumed run
reads the crops an uninterrupted one read.
"""

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxrobust.checks import InputError, integer_at_least

if TYPE_CHECKING:
  from PIL import Image

# RandomResizedCrop's defaults: the crop's share of the image's area, and its
# width / height.
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
# Evaluation resizes the shorter side to size / CROP_FRACTION (256 for 224),
# then crops the center size x size.
CROP_FRACTION = 0.875
# torchvision's ImageNet statistics, the `Normalize` of its and RobustBench's
# ImageNet models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # (top, left, height, width)


def example_rng(seed: int, epoch: int, source: int, index: int) -> np.random.Generator:
  """The random generator of one example's crop and flip in one epoch.

  Args:
    seed: the run's seed.
    epoch: the epoch.
    source: which data set of a mixture (0: the first).
    index: the example's index in its data set.

  Returns:
    `np.random.default_rng([seed, epoch, source, index])`.
  """
  return np.random.default_rng([seed, epoch, source, index])


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: tuple[float, float] = SCALE,
  ratio: tuple[float, float] = RATIO,
) -> Box:
  """torchvision's `RandomResizedCrop.get_params`: a random box of the image.

  Up to 10 tries draw an area share a ~ U(scale) and a log aspect ratio
  log r ~ U(log ratio); the box is w = round(sqrt(a H W r)) by
  h = round(sqrt(a H W / r)), at a uniform position, when it fits. Else the
  central box of the whole image, its aspect ratio clamped to `ratio`.

  Args:
    rng: the example's generator.
    height: the image's height H.
    width: the image's width W.
    scale: the bounds of the area share.
    ratio: the bounds of width / height.

  Returns:
    (top, left, height, width) of the box.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
  """torchvision's `Resize(shorter)`: the shorter side to `shorter`, the aspect kept.

  Args:
    height: the image's height.
    width: the image's width.
    shorter: the new length of the shorter side.

  Returns:
    (new height, new width); the longer side is `int(shorter * long / short)`.
  """
  if height <= width:
    return shorter, int(shorter * width / height)
  return int(shorter * height / width), shorter


def center_crop_box(height: int, width: int, size: int) -> Box:
  """torchvision's `CenterCrop(size)` box of an image at least `size` on each side.

  Args:
    height: the image's height.
    width: the image's width.
    size: the crop's side.

  Returns:
    (top, left, size, size), the offsets `round((side - size) / 2)`.
  """
  return int(round((height - size) / 2)), int(round((width - size) / 2)), size, size


def open_rgb(data: bytes | str | Path, where: object) -> "Image.Image":
  """An encoded image (its bytes, or a file), decoded to RGB with Pillow.

  Grey, CMYK and palette images (ImageNet holds a few) become RGB.

  Args:
    data: the encoded image, or its path.
    where: the image's place, for the message.

  Returns:
    The RGB `PIL.Image`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
      return image.convert("RGB")
  except (OSError, SyntaxError, ValueError) as error:
    raise InputError(f"cannot decode the image {where}: {error}") from error


def train_crop(image: "Image.Image", rng: np.random.Generator, size: int) -> np.ndarray:
  """Random-resized-crop to size x size, then a horizontal flip with probability 1/2.

  Args:
    image: an RGB `PIL.Image`.
    rng: the example's generator (`example_rng`): the box, then the flip.
    size: the output's side.

  Returns:
    uint8 pixels [size, size, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  integer_at_least("image_size", size, 1)
  top, left, h, w = random_resized_crop_box(rng, image.height, image.width)
  crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
  pixels = np.asarray(crop, np.uint8)
  return np.ascontiguousarray(pixels[:, ::-1]) if rng.random() < 0.5 else pixels


def eval_crop(image: "Image.Image", size: int) -> np.ndarray:
  """Resize the shorter side to `round(size / CROP_FRACTION)`, crop the center size x size.

  For size 224: torchvision's `Resize(256)` then `CenterCrop(224)`, the
  preprocessing of RobustBench's ImageNet models ("Res256Crop224").

  Args:
    image: an RGB `PIL.Image`.
    size: the output's side.

  Returns:
    uint8 pixels [size, size, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  integer_at_least("image_size", size, 1)
  h, w = resized_shape(image.height, image.width, round(size / CROP_FRACTION))
  resized = image.resize((w, h), Image.Resampling.BILINEAR)
  top, left, _, _ = center_crop_box(h, w, size)
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)
