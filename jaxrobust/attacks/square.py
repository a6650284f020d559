"""The Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square
attack: a query-efficient black-box adversarial attack via random search"),
as its authors' code runs it, in the L-infinity, L2 and L1 balls.

* L-infinity: start from vertical stripes, x + eps s with s = +-1 per
  column and channel; each candidate adds +-2 eps (one sign per channel)
  on a random square of side h of the current best point, clipped to the
  ball and the box.
* L2 and L1: start from a grid of 5 x 5 windows, each filled with +-eta
  (nested rectangles, opposite signs in the two halves, transposed with
  probability 1/2), brought into the ball; each candidate moves the
  perturbation's mass of two random squares (side h, odd, >= 3) into the
  first, as a fresh +-eta plus the old content (`_moved_window`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust import checks
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, factory, make

# The authors' schedule for p (the fraction of pixels a square covers), for a
# budget of 10,000 queries: p is halved once the iteration passes each of these.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_TINY = 1e-12
# The L1 ball the authors project onto: radius eps (1 - 1e-6).
_L1_INSIDE = 1.0 - 1e-6


@factory("square")
def square(
  *,
  norm: str = "linf",
  eps: float,
  queries: int = 5000,
  p_init: float = 0.8,
  restarts: int = 1,
  rescale_schedule: bool = False,
  targeted: bool = False,
) -> Attack:
  """Square: random search for a misclassified point, with forward passes only.

  Threat model: x_adv = x + d, ||d||_p <= eps (p = inf, 2 or 1), x_adv in
  [0, 1]. Score-based: it reads the logits and never a gradient, so gradient
  masking cannot stop it (the check AutoAttack runs it for). Per example it
  minimises the margin loss, of the logits z of x',

    m(x') = z_y - max_{i != y} z_i      (untargeted; <= 0: misclassified),
    m(x') = max_{i != t} z_i - z_t      (targeted, y = t; <= 0: classified as t),

  by random search over perturbations made of squares (the module's
  docstring), keeping a candidate when its margin is lower.

  A square's side is h = round(sqrt(p H W)) (`_sides`), its corner uniform
  (`_corner`); p starts at `p_init` and is halved after the iterations of
  `P_SCHEDULE` (`_halvings`). An example stops changing once m(x') <= 0, and
  the search (a `core.loop_until`) stops once every example of the batch
  has. Squares, signs and patterns are drawn per example from its key, so
  results do not depend on the batch. Cost: per restart 1 + `queries`
  forward passes.

  Args:
    norm: "linf", "l2" or "l1".
    eps: radius of the ball, > 0.
    queries: candidates per restart, >= 0 (0: the start only; AutoAttack:
      5,000).
    p_init: the starting fraction of pixels per square, in (0, 1].
    restarts: independent runs per example, >= 1 (each keeps its best).
    rescale_schedule: scale the schedule's iterations to the budget.
    targeted: y is the target class t to reach, not the true class.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv` for
    images [B, H, W, C]: per example the point found with m(x') <= 0
    (misclassified; classified as the target), else the point of lowest
    margin m.

  References:
    Andriushchenko, Croce, Flammarion & Hein, 2020, "Square attack: a
    query-efficient black-box adversarial attack via random search"
    (Algorithm 3 for L2).
  """
  norm = core.check_norm(norm, ("linf", "l2", "l1"))
  core.check_eps(eps)
  queries = checks.integer_at_least("queries", queries, 0)
  checks.in_interval("p_init", p_init, 0.0, 1.0, closed=(False, True))
  restarts = checks.integer_at_least("restarts", restarts, 1)
  checks.require(isinstance(targeted, bool), f"targeted must be True or False, got {targeted!r}")
  search = functools.partial(
    _random_search,
    norm=norm,
    queries=queries,
    p_init=p_init,
    halvings=_halvings(queries, rescale_schedule),
    targeted=targeted,
  )

  def attack_one(logits_one, x, y, key, eps):
    run = lambda k: search(core.canonical_convolutions(logits_one), x, y, k, eps)
    return x + core.best_of_restarts(run, key, restarts)[0]

  def attack(logits_fn, x, y, key, eps):
    checks.require(
      jnp.ndim(x) == 4,
      f"square needs images [batch, height, width, channels], got shape {tuple(jnp.shape(x))}",
    )
    return core.batched(attack_one, logits_fn, x, y, key, core.check_eps(eps))

  return make(attack, uses_gradients=False)


def _random_search(forward, x, y, key, eps, *, norm, queries, p_init, halvings, targeted):
  """One run of the search on one example: (delta, -margin, success)."""
  if norm == "linf":
    start, propose = _linf_start, _linf_propose
  else:
    start = functools.partial(_grid_start, norm=norm)
    propose = functools.partial(_window_propose, norm=norm)
  sides = jnp.asarray(_sides(p_init, x.shape, norm))

  def margin(point):
    logits = forward(point)
    m = logits[y] - losses.other_max(logits, y)
    return -m if targeted else m

  start_key, search_key = jax.random.split(key)
  best = start(start_key, x, eps)

  def query(i, state):
    best, best_margin = state
    size = sides[_level(i, halvings)]
    candidate = propose(jax.random.fold_in(search_key, i), x, best, eps, size)
    candidate_margin = margin(candidate)
    take = (best_margin > 0) & (candidate_margin < best_margin)
    return jnp.where(take, candidate, best), jnp.where(take, candidate_margin, best_margin)

  # A fooled example (margin <= 0) takes no candidate again: stop there.
  best, best_margin = core.loop_until(
    lambda s: s[1] <= 0, 0, queries, query, (best, margin(best)), like=x
  )
  return best - x, -best_margin, best_margin <= 0


# --- the schedule ------------------------------------------------------------------


def _halvings(queries, rescale_schedule):
  """The first iteration past each boundary b of `P_SCHEDULE`.

  p at iteration
  i = 0, 1, ... is p_init / 2^k, k the number of these <= i. As the authors'
  p_selection: i passes b when t > b, t = i, or t = int(i / queries * 10000)
  (in double precision) with the schedule rescaled to the budget."""
  if not rescale_schedule or queries == 0:
    return tuple(b + 1 for b in P_SCHEDULE)
  scaled = lambda i: int(i / queries * 10000)
  firsts = []
  for b in P_SCHEDULE:
    i = math.ceil((b + 1) * queries / 10000)
    while i > 0 and scaled(i - 1) > b:
      i -= 1
    while scaled(i) <= b:
      i += 1
    firsts.append(i)
  return tuple(firsts)


def _level(i, halvings):
  """How often p has been halved by iteration i (traced): p = p_init / 2^level."""
  return jnp.sum(i >= jnp.asarray(halvings, jnp.int32))


def _sides(p_init, shape, norm):
  """The square's side at each level k = 0..9, p = p_init / 2^k, as the
  authors compute it: round(sqrt(p H W)) (half to even), at least 1 (L-inf),
  or at least 3 and then odd (L2, L1), and at most min(H, W). [10] int32."""
  height, width, channels = shape
  features = height * width * channels
  sides = []
  for k in range(len(P_SCHEDULE) + 1):
    p = p_init / 2**k
    side = max(int(round(math.sqrt(p * features / channels))), 1 if norm == "linf" else 3)
    if norm != "linf" and side % 2 == 0:
      side += 1
    sides.append(min(side, height, width))
  return np.asarray(sides, np.int32)


def _corner(key, extent, size):
  """A square's first row (or column) on an axis of `extent` pixels: uniform
  over 0..extent-size-1 (0 when the square fills the axis), the authors'
  random_int(0, extent - size)."""
  return jax.random.randint(key, (), 0, jnp.maximum(extent - size, 1))


def _window(key, shape, size):
  """A random square of side `size` (traced) on the [H, W, C] image: its mask
  [H, W, 1] and its corner (`_corner`)."""
  height, width, _ = shape
  top_key, left_key = jax.random.split(key)
  top, left = _corner(top_key, height, size), _corner(left_key, width, size)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return inside, top, left


def _signs(key, shape, dtype):
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)


# --- L-infinity --------------------------------------------------------------------


def _linf_start(key, x, eps):
  """Vertical stripes: x + eps s, s = +-1 per column and channel, in the box."""
  _, width, channels = x.shape
  return jnp.clip(x + eps * _signs(key, (1, width, channels), x.dtype), 0.0, 1.0)


def _linf_propose(key, x, best, eps, size):
  """best + 2 eps s on a random square of side `size` (s = +-1 per channel),
  clipped to the ball and the box."""
  window_key, sign_key = jax.random.split(key)
  inside, _, _ = _window(window_key, x.shape, size)
  candidate = best + inside * 2.0 * eps * _signs(sign_key, (1, 1, x.shape[-1]), x.dtype)
  return jnp.clip(jnp.clip(candidate, x - eps, x + eps), 0.0, 1.0)


# --- L2 and L1 ---------------------------------------------------------------------


def _grid_start(key, x, eps, *, norm):
  """The authors' L2 / L1 start: windows of side s = H // 5 from row and
  column (H - 5 s) // 2 on, every s pixels, those that fit, each filled with
  eta (`_eta`, transposed with probability 1/2) times +-1 per channel; the
  sum brought into the ball (`_into_ball`)."""
  height, width, channels = x.shape
  size = max(height // 5, 1)
  offset = max((height - 5 * size) // 2, 0)
  row, i = _tiles(height, size, offset)
  col, j = _tiles(width, size, offset)
  columns = max(col.max() + 1, 1)
  windows = max(row.max() + 1, 1) * columns
  which = np.where((row[:, None] >= 0) & (col >= 0), row[:, None] * columns + col, -1)
  flip_key, sign_key = jax.random.split(key)
  flip = jax.random.bernoulli(flip_key, 0.5, (windows,))[np.maximum(which, 0)]
  pattern = _eta(size, norm)
  eta = jnp.where(flip, pattern[j[None, :], i[:, None]], pattern[i[:, None], j[None, :]])
  signs = _signs(sign_key, (windows, channels), x.dtype)[np.maximum(which, 0)]
  delta = jnp.where(which[:, :, None] >= 0, eta[:, :, None] * signs, 0.0).astype(x.dtype)
  return _into_ball(x, delta, eps, norm)


def _tiles(extent, size, offset):
  """Per pixel of an axis, the start's window that holds it (-1: none) and
  its place in that window: windows from `offset` on, every `size` pixels,
  at most extent // size of them, those that fit."""
  shifted = np.arange(extent) - offset
  count = min(extent // size, (extent - offset) // size)
  window = np.where((shifted >= 0) & (shifted // size < count), shifted // size, -1)
  return window, shifted % size


def _window_propose(key, x, best, eps, size, *, norm):
  """The authors' L2 / L1 candidate: two random squares W1, W2 of side `size`;
  W1 gets a fresh eta (transposed with probability 1/2) times +-1 per channel
  plus its old content, W2 is emptied (`_moved_window`); then into the ball."""
  height, width, channels = x.shape
  first_key, second_key, flip_key, sign_key = jax.random.split(key, 4)
  first, top, left = _window(first_key, x.shape, size)
  second, _, _ = _window(second_key, x.shape, size)
  transpose = jax.random.bernoulli(flip_key)
  fresh = _eta_on_grid(height, width, top, left, size, transpose, norm).astype(x.dtype)
  fresh = fresh[:, :, None] * _signs(sign_key, (1, 1, channels), x.dtype)
  return _into_ball(x, _moved_window(best - x, first, second, fresh, eps, norm), eps, norm)


def _channel_norms(v, norm):
  """The L2 or L1 norm of each channel of v [H, W, C]: [C]."""
  if norm == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(v), (0, 1)))
  return jnp.sum(jnp.abs(v), (0, 1))


def _moved_window(delta, first, second, fresh, eps, norm):
  """One move of the paper's Algorithm 3, per channel c as the authors' code
  (norms ||.|| L2 or L1, over the pixels named; `fresh` zero outside W1):

    u_c = fresh_c + d_c[W1] / ||d_c[W1]||,
    d'_c[W1] = m_c u_c / ||u_c||,   d'[W2 \\ W1] = 0,   d' = d elsewhere,

  m_c = sqrt((eps^2 - ||d||_2^2)_+ / C + ||d_c[W1 u W2]||_2^2)   (L2),
  m_c = C ((eps - ||d||_1)_+ / C + ||d_c[W1 u W2]||_1)           (L1).

  L2: each channel keeps its own mass of the two squares plus a 1 / C share
  of the budget left, so ||d'||_2 = eps when ||d||_2 <= eps and the rest of d
  is kept as it is. L1 overshoots the ball; the projection brings it back.
  """
  channels = delta.shape[-1]
  in_first = _channel_norms(delta * first, norm)
  in_windows = _channel_norms(delta * (first | second), norm)
  moved = fresh + delta * first / (in_first + _TINY)
  if norm == "l2":
    mass = jnp.sqrt(jnp.maximum(eps**2 - core.l2_norm(delta) ** 2, 0.0) / channels + in_windows**2)
  else:
    mass = (jnp.maximum(eps - core.l1_norm(delta), 0.0) / channels + in_windows) * channels
  moved = moved / (_channel_norms(moved, norm) + _TINY) * mass
  return jnp.where(first, moved, jnp.where(second, 0.0, delta))


def _into_ball(x, delta, eps, norm):
  """x + delta brought into the ball as the authors' code: L2 scales delta to
  norm eps, then clips to the box; L1 projects it onto the L1 ball of radius
  eps (1 - 1e-6) intersected with the box (`core.project_l1_box`)."""
  if norm == "l2":
    return jnp.clip(x + eps * delta / (core.l2_norm(delta) + _TINY), 0.0, 1.0)
  return jnp.clip(x + core.project_l1_box(x, delta, eps * _L1_INSIDE), 0.0, 1.0)


# --- the pattern eta ---------------------------------------------------------------


def _harmonic(n, power):
  """H[k] = sum_{j=1}^{k} 1 / j^power for k = 0..n."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** power)])


def _rectangles(i, j, rows, cols, table, xp):
  """The authors' nested-rectangle pattern of a rows x cols block at (i, j),
  before normalisation: the sum of 1 / (k + 1)^power over the rectangles k
  that hold the cell, centred at (rows // 2, cols // 2):
  H[K] - H[max(|di|, |dj|)], K = max(rows // 2, cols // 2) + 1."""
  reach = xp.maximum(xp.abs(i - rows // 2), xp.abs(j - cols // 2))
  count = xp.maximum(rows // 2, cols // 2) + 1
  return xp.where(reach < count, table[count] - table[xp.minimum(reach, count)], 0.0)


def _eta_at(i, j, size, limit, xp, norm):
  """The pattern eta of side `size` at local coordinates (i, j) (zero outside
  the square): the upper half the nested rectangles (weights 1 / (k + 1)^2
  for L2, 1 / (k + 1)^4 for L1), the lower half their negative, each half and
  then the whole of unit L2 (L1) norm. In closed form over any grid, so
  `size` (at most `limit`) may be traced (xp = jnp) or not (numpy)."""
  power = 2 if norm == "l2" else 4
  table = xp.asarray(_harmonic(limit // 2 + 1, power), xp.float32)
  inside = (i >= 0) & (i < size) & (j >= 0) & (j < size)
  half = size // 2
  upper = xp.where(inside & (i < half), _rectangles(i, j, half, size, table, xp), 0.0)
  lower = xp.where(
    inside & (i >= half), _rectangles(i - half, j, size - half, size, table, xp), 0.0
  )
  if norm == "l2":
    unit = lambda v: v / xp.maximum(xp.sqrt(xp.sum(xp.square(v))), _TINY)
  else:
    unit = lambda v: v / xp.maximum(xp.sum(xp.abs(v)), _TINY)
  return unit(unit(upper) - unit(lower))


def _eta_on_grid(height, width, top, left, size, transpose, norm):
  """eta of side `size` placed at (top, left) on an H x W grid, transposed
  when `transpose` (traced values)."""
  i = jnp.arange(height)[:, None] - top
  j = jnp.arange(width)[None, :] - left
  return _eta_at(
    jnp.where(transpose, j, i), jnp.where(transpose, i, j), size, max(height, width), jnp, norm
  )


def _eta(size, norm="l2"):
  """eta of a static `size`, [size, size] (not transposed), in numpy."""
  grid = np.arange(size)
  return _eta_at(grid[:, None], grid[None, :], size, size, np, norm).astype(np.float32)
