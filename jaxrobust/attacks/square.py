"""The Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square
attack: a query-efficient black-box adversarial attack via random search")."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, make

# The paper's schedule for p (the fraction of pixels a square covers): halved
# after each of these iterations, for a budget of 10,000 queries.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square(
  *,
  norm="linf",
  eps,
  queries=5000,
  p_init=0.8,
  restarts=1,
  rescale_schedule=False,
  targeted=False,
) -> Attack:
  """Square: random search for a misclassified point (or one classified as a
  target), with forward passes only.

  Threat model: x_adv = x + d, ||d||_p <= eps (p = inf or 2), x_adv in
  [0, 1]. Score-based: it reads the logits and never a gradient, so gradient
  masking cannot stop it (the check AutoAttack runs it for). Per example it
  minimises the margin loss, of the logits z of x',

    m(x') = z_y - max_{i != y} z_i      (untargeted; <= 0: misclassified),
    m(x') = max_{i != t} z_i - z_t      (targeted, y = t; <= 0: classified as t),

  (the targeted one is the margin loss of AutoAttack's targeted Square), by
  random search over perturbations made of squares:

  * L-infinity: start from vertical stripes, x + eps s with s = +-1 per
    column and channel; each query adds +-2 eps (one sign per channel) on a
    random square of side h = round(sqrt(p H W)) of the current best point,
    clips to the ball and the box, and keeps it if the loss falls.
  * L2: start from a grid of 5 x 5 windows, each filled with +-eta (a
    pattern of nested rectangles, opposite signs in its two halves) and the
    whole scaled to norm eps; each query moves the perturbation's mass of
    two random squares (side h, odd, >= 3) into the first one, as a fresh
    +-eta pattern plus the old content, keeping the norm at eps (the
    paper's Algorithm 3).

  p starts at `p_init` and is halved after iterations 10, 50, 200, 500, 1000,
  2000, 4000, 6000 and 8000 (the paper's schedule for 10,000 queries;
  AutoAttack runs it unchanged for its 5,000; with `rescale_schedule` the
  iterations are scaled to the budget instead). An example stops changing
  once m(x') <= 0. Squares, signs and patterns are drawn per example from
  its key, so results do not depend on the batch.

  Cost: at most `queries` forward passes per restart, the start's included
  (the authors' code counts its start apart: it runs one more); the search
  is a `lax.while_loop` that stops once every example of the batch has
  m(x') <= 0 (`core.loop_until`; as the authors' code, which queries only
  the examples not yet fooled).

  Args:
    norm: "linf" or "l2".
    eps: radius of the ball, > 0.
    queries: forward passes, >= 0 (0: no query, x is returned; AutoAttack:
      5,000).
    p_init: the starting fraction of pixels per square, in (0, 1].
    restarts: independent runs per example, >= 1 (each keeps its best).
    rescale_schedule: scale the schedule's iterations by queries / 10,000.
    targeted: y is the target class t to reach, not the true class.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv` for
    images [B, H, W, C]: per example the point found with m(x') <= 0
    (misclassified; classified as the target), else the point of lowest
    margin m.
  """
  norm = core.check_norm(norm)
  core.check_eps(eps)
  queries = checks.integer_at_least("queries", queries, 0)
  checks.in_interval("p_init", p_init, 0.0, 1.0, closed=(False, True))
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.require(isinstance(targeted, bool), f"targeted must be True or False, got {targeted!r}")
  scale = queries / 10_000 if rescale_schedule else 1.0
  boundaries = jnp.asarray([math.ceil(b * scale) for b in P_SCHEDULE], jnp.int32)

  def attack_one(logits_one, x, y, key, eps):
    height, width, channels = x.shape
    forward = core.canonical_convolutions(logits_one)

    def margin(point):
      logits = forward(point)
      m = logits[y] - losses.other_max(logits, y)
      return -m if targeted else m

    def side(i, minimum):
      """The square's side at iteration i: round(sqrt(p H W)), at least `minimum`."""
      p = p_init / 2.0 ** jnp.sum(i >= boundaries)
      return jnp.clip(jnp.round(jnp.sqrt(p * height * width)), minimum, min(height, width)).astype(
        jnp.int32
      )

    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]

    def window(key, size):
      """A random square [H, W, 1] of side `size`, its corner uniform over
      every place where it fits (the authors' code never picks the last)."""
      top_key, left_key = jax.random.split(key)
      top = jax.random.randint(top_key, (), 0, height - size + 1)
      left = jax.random.randint(left_key, (), 0, width - size + 1)
      inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
      return inside, top, left

    def signs(key, shape):
      return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(x.dtype)

    if norm == "linf":

      def start(key):
        return jnp.clip(x + eps * signs(key, (1, width, channels)), 0.0, 1.0)

      def propose(i, key, best):
        window_key, sign_key = jax.random.split(key)
        inside, _, _ = window(window_key, side(i, 1))
        candidate = best + inside * 2.0 * eps * signs(sign_key, (1, 1, channels))
        return jnp.clip(jnp.clip(candidate, x - eps, x + eps), 0.0, 1.0)
    else:

      def scaled(delta):
        return jnp.clip(x + eps * delta / (core.l2_norm(delta) + 1e-12), 0.0, 1.0)

      def start(key):
        size = max(height // 5, 1)
        offset = (height - 5 * size) // 2
        pattern = jnp.asarray(_eta(size), x.dtype)[:, :, None]
        corners = [
          (offset + r * size, offset + c * size)
          for r in range(height // size)
          for c in range(width // size)
        ]
        corners = [(t, l) for t, l in corners if t + size <= height and l + size <= width]
        keys = jax.random.split(key, len(corners))
        delta = jnp.zeros_like(x)
        for k, (top, left) in zip(keys, corners):
          delta = delta.at[top : top + size, left : left + size].add(
            pattern * signs(k, (1, 1, channels))
          )
        return scaled(delta)

      def propose(i, key, best):
        keys = jax.random.split(key, 4)
        size = side(i, 3)
        size = size + (size % 2 == 0)  # odd
        first, top, left = window(keys[0], size)
        second, _, _ = window(keys[1], size)
        delta = best - x
        norm_image = core.l2_norm(delta)
        in_first = jnp.sqrt(jnp.sum(jnp.square(delta * first), (0, 1)))  # per channel
        in_windows = core.l2_norm(delta * (first | second))
        transpose = jax.random.bernoulli(keys[2])
        fresh = _eta_on_grid(height, width, top, left, size, transpose).astype(x.dtype)
        fresh = fresh[:, :, None] * signs(keys[3], (1, 1, channels))
        moved = fresh + delta * first / (in_first + 1e-12)
        moved = moved / (jnp.sqrt(jnp.sum(jnp.square(moved), (0, 1))) + 1e-12)
        moved = moved * jnp.sqrt(
          jnp.maximum(eps**2 - norm_image**2, 0.0) / channels + in_windows**2
        )
        delta = jnp.where(second, 0.0, delta)
        delta = jnp.where(first, moved, delta)
        return scaled(delta)

    def run(key):
      start_key, search_key = jax.random.split(key)
      best = start(start_key)
      best_margin = margin(best)

      def query(i, state):
        best, best_margin = state
        candidate = propose(i, jax.random.fold_in(search_key, i), best)
        candidate_margin = margin(candidate)
        take = (best_margin > 0) & (candidate_margin < best_margin)
        return jnp.where(take, candidate, best), jnp.where(take, candidate_margin, best_margin)

      # A fooled example (margin <= 0) takes no candidate again: stop there.
      best, best_margin = core.loop_until(
        lambda s: s[1] <= 0, 0, queries - 1, query, (best, best_margin), like=x
      )
      return best - x, -best_margin, best_margin <= 0

    if queries == 0:
      return x
    return x + core.best_of_restarts(run, key, restarts)[0]

  def attack(logits_fn, x, y, key, eps):
    checks.require(
      jnp.ndim(x) == 4,
      f"square needs images [batch, height, width, channels], got shape {tuple(jnp.shape(x))}",
    )
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return make(
    attack,
    "square",
    norm=norm,
    eps=eps,
    targeted=targeted,
    queries=queries,
    p_init=p_init,
    restarts=restarts,
    rescale_schedule=rescale_schedule,
  )


def _harmonic_squares(n):
  """H[k] = sum_{j=1}^{k} 1 / j^2 for k = 0..n."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** 2)])


def _rectangles(i, j, rows, cols, table, xp):
  """The authors' nested-rectangle pattern of a rows x cols block at (i, j),
  before normalisation: the sum of 1 / (k + 1)^2 over the rectangles k that
  hold the cell, centred at (rows // 2, cols // 2):
  H[K] - H[max(|di|, |dj|)], K = max(rows // 2, cols // 2) + 1."""
  reach = xp.maximum(xp.abs(i - rows // 2), xp.abs(j - cols // 2))
  count = xp.maximum(rows // 2, cols // 2) + 1
  return xp.where(reach < count, table[count] - table[xp.minimum(reach, count)], 0.0)


def _eta_at(i, j, size, limit, xp):
  """The L2 pattern eta of side `size` at local coordinates (i, j) (zero
  outside the square): the upper half the nested rectangles, the lower half
  their negative, each half and then the whole of unit L2 norm. In closed
  form over any grid, so `size` (at most `limit`) may be traced (xp = jnp)
  or not (numpy)."""
  table = xp.asarray(_harmonic_squares(limit // 2 + 1), xp.float32)
  inside = (i >= 0) & (i < size) & (j >= 0) & (j < size)
  half = size // 2
  upper = xp.where(inside & (i < half), _rectangles(i, j, half, size, table, xp), 0.0)
  lower = xp.where(
    inside & (i >= half), _rectangles(i - half, j, size - half, size, table, xp), 0.0
  )
  unit = lambda v: v / xp.maximum(xp.sqrt(xp.sum(xp.square(v))), 1e-12)
  return unit(unit(upper) - unit(lower))


def _eta_on_grid(height, width, top, left, size, transpose):
  """eta of side `size` placed at (top, left) on an H x W grid, transposed
  when `transpose` (traced values)."""
  i = jnp.arange(height)[:, None] - top
  j = jnp.arange(width)[None, :] - left
  return _eta_at(
    jnp.where(transpose, j, i), jnp.where(transpose, i, j), size, max(height, width), jnp
  )


def _eta(size):
  """eta of a static `size`, [size, size] (not transposed), in numpy."""
  grid = np.arange(size)
  return _eta_at(grid[:, None], grid[None, :], size, size, np).astype(np.float32)
