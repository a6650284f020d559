"""Data augmentation on device, inside the jitted training step.

The standard CIFAR-10 augmentation of every robust-training paper since
Madry et al. 2018 (torchvision's `RandomCrop(32, padding=4)` followed by
`RandomHorizontalFlip()`), per example: for an image x of size H x W,

  pad    P = pad(x, p)                   (p pixels on each side: zeros, or a
                                          reflection without repeating the edge)
  crop   c = P[dy : dy + H, dx : dx + W], dy, dx ~ U{0, ..., 2p} independently
  flip   out = c[:, ::-1] with probability 1/2 (left-right mirror)

Every draw of example i comes from its own key k_i (`keys.example_keys`, the
key folded with the example's global index in the step's batch): the crops
and flips depend neither on the batch size, nor on the device count, nor on
whether the run was resumed. From k_i: the offsets from `fold_in(k_i, 0)`,
the flip from `fold_in(k_i, 1)`.

A flipped digit is another digit: `digits` trains without augmentation.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust.types import Images

Augment = Callable[[Images, jax.Array], Images]

NAMES = ("none", "crop_flip", "crop", "flip")
PADDING_MODES = ("zero", "reflect")


def create(
  name: str = "crop_flip", *, padding: int = 4, padding_mode: str = "zero"
) -> Augment | None:
  """The augmentation `name`, a pure function `augment(x, keys) -> x_aug`.

  Args:
    name: "crop_flip" (random crop, then horizontal flip), "crop", "flip" or
      "none".
    padding: p, the pixels padded on each side before the crop (>= 1; a
      reflection needs p < H and p < W).
    padding_mode: "zero" (torchvision's default) or "reflect" (the
      reflection about the edge pixel, numpy's and torchvision's "reflect").

  Returns:
    `augment(x, keys)` on a batch x [B, H, W, C] with one PRNG key per
    example; None for "none".

  Raises:
    InputError: an unknown name or padding mode, or padding < 1.
  """
  checks.one_of("data.augment", name, NAMES)
  if name == "none":
    return None
  crop = name in ("crop_flip", "crop")
  flip = name in ("crop_flip", "flip")
  if crop:
    padding = checks.integer_at_least("data.crop_padding", padding, 1)
    checks.one_of("data.padding_mode", padding_mode, PADDING_MODES)

  def augment_one(x: jax.Array, key: jax.Array) -> jax.Array:
    if crop:
      offsets = jax.random.randint(jax.random.fold_in(key, 0), (2,), 0, 2 * padding + 1)
      x = crop_at(x, offsets[0], offsets[1], padding=padding, padding_mode=padding_mode)
    if flip:
      mirror = jax.random.bernoulli(jax.random.fold_in(key, 1))
      x = jnp.where(mirror, x[:, ::-1], x)
    return x

  def augment(x: Images, keys: jax.Array) -> Images:
    checks.require(
      x.ndim == 4, f"augmentation takes images [B, H, W, C], got shape {tuple(x.shape)}"
    )
    if crop and padding_mode == "reflect":
      checks.require(
        padding < min(x.shape[1:3]),
        f"data.crop_padding {padding} must be smaller than the image "
        f"({x.shape[1]}x{x.shape[2]}) to reflect",
      )
    return jax.vmap(augment_one)(jnp.asarray(x), keys)

  return augment


def crop_at(
  x: jax.Array,
  dy: jax.Array | int,
  dx: jax.Array | int,
  *,
  padding: int,
  padding_mode: str = "zero",
) -> jax.Array:
  """One image padded and cropped back to its size.

  Args:
    x: an image [H, W, C].
    dy: the crop's row offset in the padded image.
    dx: its column offset (dy = dx = padding: x itself).
    padding: the pixels padded on each side.
    padding_mode: "zero" or "reflect".

  Returns:
    The [H, W, C] crop.
  """
  mode = "constant" if padding_mode == "zero" else "reflect"
  padded = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)), mode=mode)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)
