"""A jaxpr interpreter that evaluates each equation through a rewrite rule.

A rule takes the equation and its input values and returns the output values
computed differently, or None to bind the primitive as it is. Higher-order
primitives are rebuilt around their rewritten bodies: `jit`/`pjit` and
`closed_call` are inlined; `checkpoint`, `scan`, `while` and `cond` keep
their settings; `custom_jvp_call`, `custom_vjp_call`, `shard_map` and any
other primitive are bound as they are (their insides are not rewritten).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core as jax_core

from jaxrobust.fastpath import convolution, pooling

Rule = Callable[..., Sequence[Any] | None]


def evaluate(jaxpr: jax_core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Evaluates `jaxpr` on `args` with every primitive rewritten (`RULES`).

  Args:
    jaxpr: the program.
    consts: the values of its constvars.
    args: the values of its invars.

  Returns:
    The values of its outvars.
  """
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  padded = {}  # the outputs of `pad`: (its equation, its inputs)
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive.name == "pad":
      padded[eqn.outvars[0]] = (eqn, inputs)
    rule = RULES.get(eqn.primitive.name)
    outs: Sequence[Any] | None = None
    if eqn.primitive.name == "reduce_window_sum" and eqn.invars[0] in padded:
      outs = pooling.upsample(eqn, *padded[eqn.invars[0]])
    if outs is None and rule is not None:
      outs = rule(eqn, *inputs)
    env.update(zip(eqn.outvars, _bind(eqn, inputs) if outs is None else outs))
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn: jax_core.JaxprEqn, inputs: Sequence[Any]) -> Sequence[Any]:
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
  return outs if eqn.primitive.multiple_results else [outs]


def _closed(closed_jaxpr: jax_core.ClosedJaxpr) -> Callable[..., list[Any]]:
  """A Python function evaluating a ClosedJaxpr with the rewrites."""
  return lambda *args: evaluate(closed_jaxpr.jaxpr, closed_jaxpr.consts, args)


def _inline(eqn: jax_core.JaxprEqn, *inputs: Any) -> list[Any]:
  closed = eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]
  return evaluate(closed.jaxpr, closed.consts, inputs)


def _checkpoint(eqn: jax_core.JaxprEqn, *inputs: Any) -> list[Any]:
  p = eqn.params
  body = lambda *args: evaluate(p["jaxpr"], (), args)
  return jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*inputs)


def _scan(eqn: jax_core.JaxprEqn, *inputs: Any) -> list[Any]:
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry, xs = (
    list(inputs[:n_consts]),
    list(inputs[n_consts : n_consts + n_carry]),
    list(inputs[n_consts + n_carry :]),
  )
  body = _closed(p["jaxpr"])

  def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
    outs = body(*consts, *carry, *x)
    return list(outs[:n_carry]), list(outs[n_carry:])

  carry, ys = lax.scan(
    step, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
  )
  return [*carry, *ys]


def _while(eqn: jax_core.JaxprEqn, *inputs: Any) -> list[Any]:
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, init = inputs[:nc], inputs[nc : nc + nb], list(inputs[nc + nb :])
  cond, body = _closed(p["cond_jaxpr"]), _closed(p["body_jaxpr"])
  return lax.while_loop(
    lambda c: cond(*cond_consts, *c)[0], lambda c: list(body(*body_consts, *c)), init
  )


def _cond(eqn: jax_core.JaxprEqn, index: Any, *operands: Any) -> list[Any]:
  branches = [_closed(b) for b in eqn.params["branches"]]
  return list(lax.switch(index, [lambda *ops, b=b: list(b(*ops)) for b in branches], *operands))


RULES: dict[str, Rule] = {
  "conv_general_dilated": convolution.conv,
  "reduce_window_max": pooling.reduce_window_max,
  "reduce_window_sum": pooling.reduce_window_sum,
  "select_and_scatter_add": pooling.select_and_scatter_add,
  "select_and_gather_add": pooling.select_and_gather_add,
  "jit": _inline,
  "pjit": _inline,
  "closed_call": _inline,
  "checkpoint": _checkpoint,
  "remat2": _checkpoint,
  "scan": _scan,
  "while": _while,
  "cond": _cond,
}
