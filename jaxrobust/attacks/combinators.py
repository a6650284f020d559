"""Attacks made of attacks: the per-example worst case (for evaluation), the
per-example largest loss (for training), a random choice and a mixture that
splits a batch between attacks.

Each takes a keyword list of `Attack`s, `worst_case(attacks=[a, b])`, and
returns an `Attack` whose threat model is that of its parts when they share
one (norm and eps; then `eps=` at call time changes every part's), else
None; it uses gradients, or is stochastic, when a part is. Randomness: with per-example keys k_i (the key itself if it is a batch of
keys, else `fold_in(key, i)`), inner attack j sees `fold_in(k_i, j)` for
example i, and the combinator's own draws use `fold_in(k_i, J)`, J the number
of attacks.

Labels: the parts of a combinator are all untargeted (y the true class) or
all targeted (y the target class; `targeted=True`), and a mix is refused, so
one rule judges every candidate. Untargeted, a candidate x' succeeds when
argmax z(x') != y and its loss is the cross-entropy CE(z(x'), y) =
-log softmax(z(x'))_y, which the attacks raise; targeted, it succeeds when
argmax z(x') = y and its loss is -CE(z(x'), y), which the attacks raise by
lowering the cross-entropy to the target.
"""

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxrobust import checks
from jaxrobust import keys as keys_lib
from jaxrobust.attacks import core, losses
from jaxrobust.attacks.attack import Attack, factory, make


@factory("worst_case")
def worst_case(*, attacks: Sequence[Attack]) -> Attack:
  """Runs every attack and keeps, per example, the worst one for the model.

  The rule for evaluation.

  Per example i, with candidates x_i^(j) from attack j (in list order):

    x_adv_i = x_i^(j*),  j* = min {j : x_i^(j) succeeds}, if any succeeds,
                         j* = argmax_j L(x_i^(j), y_i)  otherwise,

  with success and L the rule of the parts (module docstring): untargeted,
  the first misclassified candidate, else the one of highest cross-entropy
  CE(z, y); targeted, the first candidate classified as the target y, else
  the one of lowest cross-entropy to the target (highest -CE(z, y)). Costs
  the sum of the attacks plus one forward pass each; an example counts as
  robust only if it resists all of them. The attacks are its `stages`: an
  evaluation may run each only on the examples the ones before left robust
  (the same per-example outcome, for less work). A stochastic model
  (attacks with EOT, `logits_fn(x, key)`) is judged on one draw per example.
  For training on the inner maximum over attacks (MAT-Max) use `max_loss`:
  this rule prefers the earlier attack whenever both succeed, whatever their
  losses.

  Args:
    attacks: a non-empty list of attacks, all untargeted or all targeted.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  attacks = _check_attacks(attacks, "worst_case")

  def choose(success, loss):
    return jnp.where(success.any(0), jnp.argmax(success, 0), jnp.argmax(loss, 0))

  return _combined(_select(attacks, choose), attacks, stages=attacks)


@factory("max_loss")
def max_loss(*, attacks: Sequence[Attack]) -> Attack:
  """Runs every attack and keeps, per example, the output of largest loss.

  The rule for training (MAT-Max, Araujo et al. 2019).

  Per example i, with candidates x_i^(j) from attack j:

    x_adv_i = x_i^(j*),  j* = argmax_j L(logits_fn(x_i^(j)), y_i),

  ties to the earlier attack, with L the loss of the parts (module
  docstring): untargeted, the cross-entropy CE(z, y) = -log softmax(z)_y
  (the loss adversarial training minimises); targeted, -CE(z, y), so the
  candidate closest to the target y in cross-entropy. This is the inner
  maximum max_j max_{d in B_j} L(x + d, y) over the attacks' balls (for
  MAT-Max, p in {2, inf}), whether or not the candidates succeed: unlike
  `worst_case`, success is not looked at. Costs the sum of the attacks plus
  one forward pass each. A stochastic model (attacks with EOT,
  `logits_fn(x, key)`) is judged on one draw per example.

  Args:
    attacks: a non-empty list of attacks, all untargeted or all targeted.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  attacks = _check_attacks(attacks, "max_loss")

  def choose(success, loss):
    del success
    return jnp.argmax(loss, 0)

  return _combined(_select(attacks, choose), attacks)


def _select(attacks, choose):
  """The attack function that runs every attack and keeps, per example, the
  candidate `choose(success [J, B], loss [J, B]) -> [B]` picks, success and
  loss by the parts' rule (untargeted or targeted)."""
  stochastic = any(a.stochastic for a in attacks)
  targeted = _targeted(attacks)

  def attack(logits_fn, x, y, key, eps):
    core.check_batch(logits_fn, x, y, stochastic=stochastic)
    keys = keys_lib.example_keys(key, x.shape[0])
    candidates = jnp.stack(
      [_call(a, logits_fn, x, y, keys_lib.fold(keys, j), eps) for j, a in enumerate(attacks)]
    )  # [J, B, ...]
    if stochastic:
      judge = keys_lib.fold(keys, len(attacks))
      logits = jax.vmap(lambda c: jax.vmap(lambda xi, k: logits_fn(xi[None], k)[0])(c, judge))(
        candidates
      )
    else:
      logits = logits_fn(candidates.reshape((-1,) + x.shape[1:]))
    logits = logits.reshape(len(attacks), x.shape[0], -1)  # [J, B, K]
    hit = jnp.argmax(logits, -1) == y
    cross_entropy = jax.vmap(jax.vmap(losses.cross_entropy), (0, None))(logits, y)
    if targeted:
      success, loss = hit, -cross_entropy
    else:
      success, loss = ~hit, cross_entropy
    return candidates[choose(success, loss), jnp.arange(x.shape[0])]

  return attack


@factory("random_choice")
def random_choice(*, attacks: Sequence[Attack], per_example: bool = False) -> Attack:
  """One attack drawn uniformly at random.

  Per batch (default): one draw for the whole batch, made from the first
  example's key, and only the drawn attack runs (a `lax.switch`); under
  data-parallel training each device's batch draws its own (MAT-Rand of Araujo
  et al. 2019 over p). Per example: an independent draw per example; every
  attack runs on the whole batch and each example keeps its own draw's output.

  Args:
    attacks: a non-empty list of attacks, all untargeted or all targeted.
    per_example: draw per example instead of per batch.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  attacks = _check_attacks(attacks, "random_choice")
  count = len(attacks)

  def attack(logits_fn, x, y, key, eps):
    core.check_batch(logits_fn, x, y)
    keys = keys_lib.example_keys(key, x.shape[0])
    if per_example:
      choice = jax.vmap(lambda k: jax.random.randint(k, (), 0, count))(keys_lib.fold(keys, count))
      outputs = jnp.stack(
        [_call(a, logits_fn, x, y, keys_lib.fold(keys, j), eps) for j, a in enumerate(attacks)]
      )
      return outputs[choice, jnp.arange(x.shape[0])]
    choice = jax.random.randint(jax.random.fold_in(keys[0], count), (), 0, count)
    # Each branch is a computation of its own, where XLA:CPU would not
    # canonicalise (and so speed up) the attack's convolutions by itself.
    branches = [
      core.canonical_convolutions(
        lambda x, y, keys, a=a, j=j: _call(a, logits_fn, x, y, keys_lib.fold(keys, j), eps)
      )
      for j, a in enumerate(attacks)
    ]
    return jax.lax.switch(choice, branches, x, y, keys)

  return _combined(attack, attacks)


@factory("mixture")
def mixture(*, attacks: Sequence[Attack], weights: Sequence[float]) -> Attack:
  """Splits each batch between the attacks in the proportions `weights`.

  Every example goes to exactly one attack and each attack runs only on its
  share (e.g. 50 % C&W, 50 % PGD examples), so a mixture
  costs about the weighted mean of its attacks. For a batch of B examples the
  share sizes are static: n_j = floor(w_j B), plus one for the B - sum_j n_j
  attacks with the largest remainders w_j B - n_j (ties to the earlier
  attack). Which examples: a random permutation of the batch (the order of
  per-example uniform draws), cut into consecutive shares; the shares are
  gathered, attacked and scattered back.

  Args:
    attacks: a non-empty list of attacks, all untargeted or all targeted.
    weights: one number >= 0 per attack, summing to 1.

  Returns:
    An `Attack`, `attack(logits_fn, x, y, key, eps=None) -> x_adv`.
  """
  attacks = _check_attacks(attacks, "mixture")
  weights = _check_weights(weights, len(attacks))

  def attack(logits_fn, x, y, key, eps):
    core.check_batch(logits_fn, x, y)
    keys = keys_lib.example_keys(key, x.shape[0])
    draws = jax.vmap(jax.random.uniform)(keys_lib.fold(keys, len(attacks)))
    order = jnp.argsort(draws)
    x_adv, start = x, 0
    for j, (a, size) in enumerate(zip(attacks, share_sizes(weights, x.shape[0]))):
      if size:
        share = order[start : start + size]
        part_eps = eps[share] if eps is not None and jnp.ndim(eps) else eps
        x_adv = x_adv.at[share].set(
          _call(a, logits_fn, x[share], y[share], keys_lib.fold(keys[share], j), part_eps)
        )
        start += size
    return x_adv

  return _combined(attack, attacks)


def share_sizes(weights: Sequence[float], batch_size: int) -> list[int]:
  """`mixture`'s share sizes: largest-remainder rounding of w_j * batch_size."""
  exact = [w * batch_size for w in weights]
  sizes = [math.floor(e) for e in exact]
  by_remainder = sorted(range(len(weights)), key=lambda j: sizes[j] - exact[j])
  for j in by_remainder[: batch_size - sum(sizes)]:
    sizes[j] += 1
  return sizes


def _combined(fn, attacks, stages=()):
  """The `Attack` of a combinator: the threat model its parts share, if any,
  their kind, and what they need."""
  norms = {a.norm for a in attacks}
  radii = {a.eps for a in attacks}
  norm = norms.pop() if len(norms) == 1 else None
  eps = radii.pop() if len(radii) == 1 and norm is not None else None
  return make(
    fn,
    norm=norm,
    eps=eps,
    targeted=_targeted(attacks),
    uses_gradients=any(a.uses_gradients for a in attacks),
    stochastic=any(a.stochastic for a in attacks),
    stages=stages,
  )


def _call(attack, logits_fn, x, y, keys, eps):
  """Calls a part with the combinator's eps (None: the part's own)."""
  if eps is None:
    return attack(logits_fn, x, y, keys)
  return attack(logits_fn, x, y, keys, eps=eps)


def _check_attacks(attacks, name):
  """The parts of combinator `name`: a non-empty list of attacks, all
  untargeted or all targeted."""
  checks.require(
    isinstance(attacks, (list, tuple)) and len(attacks) > 0,
    f"attacks must be a non-empty list of attacks, got {attacks!r}",
  )
  for a in attacks:
    checks.require(
      isinstance(a, Attack),
      f"attacks must be Attacks (from a factory, or attacks.create(spec)), got {a!r}",
    )
  flags = [_targeted((a,)) for a in attacks]
  checks.require(
    len(set(flags)) == 1,
    f"{name} cannot mix targeted and untargeted attacks: y is the target class of "
    f"{_labels(attacks, flags, True)} and the true class of {_labels(attacks, flags, False)}; "
    "combine each kind apart",
  )
  return tuple(attacks)


def _targeted(attacks):
  """Whether the parts are targeted."""
  return any(a.targeted for a in attacks)


def _labels(attacks, flags, targeted):
  """The parts whose flag is `targeted`, as "#j name" (j the index)."""
  return ", ".join(
    f"#{j} {a.name}" for j, (a, flag) in enumerate(zip(attacks, flags)) if flag == targeted
  )


def _check_weights(weights, count):
  checks.require(
    isinstance(weights, (list, tuple)) and len(weights) == count,
    f"weights must be a list of {count} numbers, one per attack, got {weights!r}",
  )
  for w in weights:
    checks.require(
      isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0,
      f"weights must be finite numbers >= 0, got {weights!r}",
    )
  checks.require(
    abs(sum(weights) - 1.0) <= 1e-6,
    f"weights must sum to 1, got {list(weights)} (sum {sum(weights):g})",
  )
  return tuple(float(w) for w in weights)
