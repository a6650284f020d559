"""Clean and adversarial accuracy of a model, per example and in aggregate.

Every example is attacked by every attack; the worst case counts an example as
robust only if it is classified correctly clean and under every attack (the
per-example minimum over attacks, which is what an adaptive adversary who
tries them all achieves). Attack randomness for example i under attack a is
`fold_in(fold_in(key, a), i)`, so the result does not depend on the batch
size or the device count.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrobust import attacks, checks, data, parallel


def build_attacks(specs):
  """`{label: attack}` from `{label: {"name": ..., **settings}}` specs."""
  built = {}
  for label, spec in specs.items():
    spec = dict(spec)
    built[label] = attacks.create(spec.pop("name"), **spec)
  return built


def select(specs, names):
  """The specs named in the comma-separated `names` ("all" or None: every one)."""
  if names in (None, "", "all"):
    return dict(specs)
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in specs]
  checks.require(not unknown, f"unknown attack {unknown[0]!r}; this run defines "
                 f"{', '.join(specs) or 'none'}" if unknown else "")
  return {n: specs[n] for n in chosen}


def make_eval_step(apply_fn, attack_fns, mesh):
  """Jitted, data-parallel `(variables, x, y, index, key) -> {label: correct [B]}`
  with label "clean" and one per attack."""

  def device_step(variables, x, y, index, key):
    logits_fn = lambda xb: apply_fn(variables, xb)
    correct = {"clean": jnp.argmax(logits_fn(x), -1) == y}
    for a, (label, attack) in enumerate(attack_fns.items()):
      keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, a), index)
      x_adv = attack(logits_fn, x, y, keys)
      correct[label] = jnp.argmax(logits_fn(x_adv), -1) == y
    return correct

  batch = P(parallel.BATCH_AXIS)
  return jax.jit(parallel.data_parallel(
      device_step, mesh, in_specs=(P(), batch, batch, batch, P()), out_specs=batch))


def per_example_correct(apply_fn, variables, x, y, attack_fns, *, key,
                        batch_size=500, mesh=None):
  """Whether each example is classified correctly, clean and under each attack.

  Returns `{label: bool array [N]}` with "clean" first, then the attacks.
  """
  checks.check_images(x)
  checks.integer_at_least("batch_size", batch_size, 1)
  mesh = mesh or parallel.mesh()
  devices = mesh.devices.size
  batch_size = devices * math.ceil(min(batch_size, len(x)) / devices)
  step = make_eval_step(apply_fn, attack_fns, mesh)
  results, start = [], 0
  for xb, yb, mask in data.eval_batches(x, y, batch_size, multiple_of=batch_size):
    index = np.arange(start, start + len(xb), dtype=np.int32)
    arrays = data.to_devices((xb, yb, index), mesh)
    out = jax.device_get(step(variables, *arrays, key))
    results.append({k: v[mask] for k, v in out.items()})
    start += int(mask.sum())
  return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def report(correct, specs):
  """The JSON-ready summary of `per_example_correct`'s output.

  `{"n_examples", "clean_accuracy", "results": [{"attack", "norm", "eps",
  "accuracy", "settings"}], "worst_case_accuracy"}`, accuracies in [0, 1];
  worst case: correct clean and under every attack.
  """
  worst = np.logical_and.reduce(list(correct.values()))
  results = []
  for label, spec in specs.items():
    settings = {k: v for k, v in dict(spec).items() if k not in ("norm", "eps")}
    results.append({"attack": label, "norm": spec.get("norm", "linf"),
                    "eps": float(spec["eps"]) if "eps" in spec else None,
                    "accuracy": float(correct[label].mean()), "settings": settings})
  return {"n_examples": int(len(worst)),
          "clean_accuracy": float(correct["clean"].mean()),
          "results": results,
          "worst_case_accuracy": float(worst.mean())}


def format_table(rep):
  """A markdown table of a `report`: clean, each attack, and the worst case."""
  lines = ["| attack | norm | eps | settings | accuracy |",
           "| --- | --- | --- | --- | --- |",
           f"| clean | | | | {100 * rep['clean_accuracy']:.2f} % |"]
  for r in rep["results"]:
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
    eps = "" if r["eps"] is None else f"{r['eps']:.4g}"
    lines.append(f"| {r['attack']} | {r['norm']} | {eps} | {settings} | "
                 f"{100 * r['accuracy']:.2f} % |")
  if rep["results"]:
    lines.append(f"| worst case | | | per example, over all attacks | "
                 f"{100 * rep['worst_case_accuracy']:.2f} % |")
  lines.append(f"\n{rep['n_examples']} examples")
  return "\n".join(lines)
