"""The attack rows: one attack call on a batch, jaxrobust against torchattacks, and
jaxrobust's PGD in its default loop form against its other forms."""

import contextlib
from typing import Any

from benchmarks.bench import Bench
from benchmarks.harness import L2_EPS, LINF_EPS, Row, make_row, time_alternately


def attack_row(
  b: Bench,
  name: str,
  label: str,
  jr_attack: Any,
  torch_attack: Any,
  steps: int,
  norm: str | None = None,
  eps: float | None = None,
) -> Row:
  """`jr_attack` against `torch_attack` on the test batches: images per second, the
  accuracy under each and, for a `norm`-bounded attack, the largest perturbation."""
  jax = b.jax
  run_jax_attack = b.sharded_attack(jr_attack)
  base_key = jax.random.key(1234)

  def jax_run(i):
    out = run_jax_attack(b.variables, b.x_dev[i], b.y_dev[i], jax.random.fold_in(base_key, i))
    return out.block_until_ready()

  def torch_run(i):
    b.torch.manual_seed(i)
    return torch_attack(b.x_torch[i], b.y_torch[i])

  jt, tt, ceil, jo, to, compile_s = time_alternately(jax_run, torch_run, b.args.repeats, b.ceiling)
  flops = steps * b.step_flops * b.batch
  row = make_row(
    name, label, jt, tt, ceil, b.batch, "images/s", flops, flops, compile_seconds=compile_s
  )
  row["agreement"] = {
    "jaxrobust": b.accuracy_of(jo),
    "pytorch": b.accuracy_of(to, nchw=True),
    "what": "accuracy under the attack",
    "examples": len(jo) * b.batch,
  }
  if norm is not None:
    row["max_perturbation"] = {
      "jaxrobust": b.max_perturbation(jo, norm),
      "pytorch": b.max_perturbation(to, norm, nchw=True),
      "norm": norm,
      "eps": eps,
    }
  return row


def pgd_linf(b: Bench) -> Row:
  """PGD-10 L-inf (8/255, step 2/255, random start) against torchattacks' PGD."""
  jr, ta = b.jr, b.torchattacks
  steps, alpha = 10, 2 / 255
  return attack_row(
    b,
    "pgd_linf",
    "PGD-10 L-inf (eps 8/255, step 2/255, random start)",
    jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps),
    ta.PGD(b.net, eps=LINF_EPS, alpha=alpha, steps=steps, random_start=True),
    steps,
    "linf",
    LINF_EPS,
  )


def loop_forms(b: Bench) -> Row:
  """jaxrobust's PGD-10 in its default loop form (a `fori_loop` whose
  model and gradients go through `jaxrobust.fastpath.fast`) against the same
  `fori_loop` without that transform, in the reference column: what the
  transform is worth on this backend (it is the identity off CPU)."""
  return _loop_row(b, "loop_forms", "plain fori_loop, no fast path", plain=True)


def loop_unrolled(b: Bench) -> Row:
  """The default loop form against the same attack unrolled (`unroll=True`),
  in the reference column."""
  return _loop_row(b, "loop_unrolled", "unrolled", unroll=True)


def _loop_row(
  b: Bench, name: str, reference: str, *, unroll: bool = False, plain: bool = False
) -> Row:
  jax, jr = b.jax, b.jr
  steps, alpha = 10, 2 / 255
  key = jax.random.key(1234)

  def timed(unroll, plain):
    attack = b.sharded_attack(
      jr.attacks.pgd(norm="linf", eps=LINF_EPS, step_size=alpha, steps=steps, unroll=unroll)
    )

    def run(i):
      # The fast path's switch is part of jit's cache key: every call of the
      # plain side runs inside `disabled()`, so it runs the plain program.
      with jr.fastpath.disabled() if plain else contextlib.nullcontext():
        return attack(
          b.variables, b.x_dev[i], b.y_dev[i], jax.random.fold_in(key, i)
        ).block_until_ready()

    return run

  jt, tt, ceil, jo, to, compile_s = time_alternately(
    timed(False, False), timed(unroll, plain), b.args.repeats, b.ceiling
  )
  flops = steps * b.step_flops * b.batch
  row = make_row(
    name,
    f"PGD-10 L-inf, jaxrobust default (fori_loop) vs {reference} (in the PyTorch column)",
    jt,
    tt,
    ceil,
    b.batch,
    "images/s",
    flops,
    flops,
    compile_seconds=compile_s,
  )
  row["agreement"] = {
    "jaxrobust": b.accuracy_of(jo),
    "pytorch": b.accuracy_of(to),
    "what": "accuracy under the attack",
    "examples": len(jo) * b.batch,
  }
  return row


def pgd_l2(b: Bench) -> Row:
  """PGD-10 L2 (0.5, step 0.125, random start) against torchattacks' PGDL2."""
  jr, ta = b.jr, b.torchattacks
  steps, alpha = 10, 2.5 * L2_EPS / 10
  return attack_row(
    b,
    "pgd_l2",
    f"PGD-10 L2 (eps {L2_EPS}, step {alpha:g}, random start)",
    jr.attacks.pgd(norm="l2", eps=L2_EPS, step_size=alpha, steps=steps),
    ta.PGDL2(b.net, eps=L2_EPS, alpha=alpha, steps=steps, random_start=True),
    steps,
    "l2",
    L2_EPS,
  )


def cw_l2(b: Bench) -> Row:
  """C&W-L2, 100 Adam steps, against torchattacks' CW (which may stop early)."""
  jr, ta = b.jr, b.torchattacks
  steps = 100
  forward_calls = []
  hook = b.net.register_forward_hook(lambda *_: forward_calls.append(1))
  try:
    row = attack_row(
      b,
      "cw_l2",
      "C&W-L2, 100 Adam steps (lr 0.01), c = 1, 1 search step",
      jr.attacks.cw_l2(steps=steps, binary_search_steps=1, c=1.0, kappa=0.0, lr=0.01),
      ta.CW(b.net, c=1.0, kappa=0.0, steps=steps, lr=0.01),
      steps,
    )
  finally:
    hook.remove()
  # torchattacks' CW calls the model once per step (and only there).
  torch_steps = len(forward_calls) / (b.args.repeats + 1)
  row["pytorch_ceiling_fraction"] *= torch_steps / steps
  row["pytorch_steps"] = torch_steps
  b.notes.append(
    f"cw_l2: torchattacks' CW stops early once its summed loss rose since the check "
    f"10 steps before: it ran {torch_steps:.0f} of the {steps} steps per run here "
    f"(its % of ceiling counts those), jaxrobust always runs all {steps}."
  )
  return row


def mi_fgsm(b: Bench) -> Row:
  """MI-FGSM, 10 steps (8/255, step 2/255, decay 1), against torchattacks' MIFGSM."""
  jr, ta = b.jr, b.torchattacks
  steps, alpha = 10, 2 / 255
  return attack_row(
    b,
    "mi_fgsm",
    "MI-FGSM, 10 steps (eps 8/255, step 2/255, decay 1)",
    jr.attacks.mi_fgsm(eps=LINF_EPS, steps=steps, step_size=alpha, decay=1.0),
    ta.MIFGSM(b.net, eps=LINF_EPS, alpha=alpha, steps=steps, decay=1.0),
    steps,
    "linf",
    LINF_EPS,
  )


def di_fgsm(b: Bench) -> Row:
  """M-DI2-FGSM, 10 steps, against torchattacks' DIFGSM."""
  jr, ta = b.jr, b.torchattacks
  steps, alpha = 10, 2 / 255
  row = attack_row(
    b,
    "di_fgsm",
    "M-DI2-FGSM, 10 steps (decay 1, p 0.5, resize 0.9)",
    jr.attacks.di_fgsm(
      eps=LINF_EPS, steps=steps, step_size=alpha, decay=1.0, prob=0.5, resize_rate=0.9
    ),
    ta.DIFGSM(
      b.net,
      eps=LINF_EPS,
      alpha=alpha,
      steps=steps,
      decay=1.0,
      resize_rate=0.9,
      diversity_prob=0.5,
      random_start=False,
    ),
    steps,
    "linf",
    LINF_EPS,
  )
  b.notes.append(
    "di_fgsm: torchattacks draws one resize-and-pad per step for the "
    "whole batch, jaxrobust one per step and example."
  )
  return row
