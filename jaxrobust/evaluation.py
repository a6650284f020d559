"""Clean and adversarial accuracy of a model, per example and in aggregate.

Every example is attacked by every attack; the worst case counts an example as
robust only if it is classified correctly clean and under every attack (the
per-example minimum over attacks, which is what an adaptive adversary who
tries them all achieves). Attack randomness for example i under attack a is
`fold_in(fold_in(key, a), i)`, so the result does not depend on the batch
size or the device count.

Transfer (black-box) evaluation crafts the examples on a source model and
classifies them with the target model. Sanity checks (Carlini et al. 2019,
"On evaluating adversarial robustness") flag results that gradient masking
typically produces.
"""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrobust import attacks, checks, data, parallel, spectral

# The sanity checks' budget: examples, and the "large" eps per norm, at which
# an attack that follows gradients must fool almost any undefended model
# (L-inf 0.5 reaches a grey image from any image; L2 0.5 sqrt(d) too).
SANITY_EXAMPLES = 200
LARGE_LINF_EPS = 0.5
NEAR_ZERO = 0.1
SWEEP_FACTORS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def build_attacks(specs):
  """`{label: attack}` from `{label: {"name": ..., **settings}}` specs."""
  return {label: attacks.create(**dict(spec)) for label, spec in specs.items()}


def select(specs, names):
  """The specs named in the comma-separated `names` ("all" or None: every one)."""
  if names in (None, "", "all"):
    return dict(specs)
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in specs]
  checks.require(not unknown, f"unknown attack {unknown[0]!r}; this run defines "
                 f"{', '.join(specs) or 'none'}" if unknown else "")
  return {n: specs[n] for n in chosen}


def make_eval_step(apply_fn, attack_fns, mesh, source_apply_fn=None):
  """Jitted, data-parallel `(variables, source_variables, x, y, index, key) -> out`.

  `out["clean"]["correct"]` and, per attack label, `out[label]["correct"]`
  (the target model classifies the adversarial example correctly) and
  `out[label]["l2"]` (||x_adv - x||_2). Examples are crafted on the source
  model (`source_apply_fn`, `source_variables`) when given, else on the target.
  """

  def device_step(variables, source_variables, x, y, index, key):
    target = lambda xb: apply_fn(variables, xb)
    source = (target if source_apply_fn is None
              else lambda xb: source_apply_fn(source_variables, xb))
    out = {"clean": {"correct": jnp.argmax(target(x), -1) == y}}
    for a, (label, attack) in enumerate(attack_fns.items()):
      keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, a), index)
      x_adv = attack(source, x, y, keys)
      out[label] = {"correct": jnp.argmax(target(x_adv), -1) == y,
                    "l2": jnp.sqrt(jnp.sum(jnp.square(x_adv - x).reshape(len(x), -1), -1))}
    return out

  batch = P(parallel.BATCH_AXIS)
  return jax.jit(parallel.data_parallel(
      device_step, mesh, in_specs=(P(), P(), batch, batch, batch, P()),
      out_specs=batch))


def per_example_results(apply_fn, variables, x, y, attack_fns, *, key,
                        batch_size=500, mesh=None, source=None):
  """Per example: correct clean, and correct and L2 distance under each attack.

  Args:
    apply_fn, variables: the target model, `apply_fn(variables, x) -> logits`.
    x, y: images in [0, 1] [N, ...] and labels [N].
    attack_fns: `{label: attack}`.
    key: PRNG key of the attacks.
    batch_size: examples per compiled batch (rounded to the device count).
    mesh: devices to split batches over (default: all).
    source: optional `(apply_fn, variables)` of the model the attacks run on.

  Returns:
    `{"clean": {"correct": bool [N]}, label: {"correct": bool [N], "l2": [N]}}`.
  """
  checks.check_images(x)
  checks.integer_at_least("batch_size", batch_size, 1)
  mesh = mesh or parallel.mesh()
  devices = mesh.devices.size
  batch_size = devices * math.ceil(min(batch_size, len(x)) / devices)
  source_apply_fn, source_variables = source or (None, None)
  step = make_eval_step(apply_fn, attack_fns, mesh, source_apply_fn)
  results, start = [], 0
  for xb, yb, mask in data.eval_batches(x, y, batch_size, multiple_of=batch_size):
    index = np.arange(start, start + len(xb), dtype=np.int32)
    arrays = data.to_devices((xb, yb, index), mesh)
    out = jax.device_get(step(variables, source_variables, *arrays, key))
    results.append(jax.tree.map(lambda v: v[mask], out))
    start += int(mask.sum())
  return jax.tree.map(lambda *v: np.concatenate(v), *results)


def threat_norm(spec):
  """The norm of an attack spec's ball: its `norm`, else its factory's default
  ("l2" for C&W-L2; None for an attack without one, such as a combinator)."""
  if "norm" in spec:
    return spec["norm"]
  if spec.get("name") == "cw_l2":
    return "l2"
  parameter = inspect.signature(attacks.ATTACKS[spec["name"]]).parameters.get("norm")
  return None if parameter is None else parameter.default


def report(results, specs):
  """The JSON-ready summary of `per_example_results`.

  `{"n_examples", "clean_accuracy", "results": [{"attack", "name", "norm",
  "eps", "accuracy", "median_l2", "settings"}], "worst_case_accuracy"}`,
  accuracies in [0, 1]; `median_l2` is the median L2 distance of the
  successful adversarial examples (correct clean, wrong after the attack), None
  if there are none; worst case: correct clean and under every attack.
  """
  clean = results["clean"]["correct"]
  worst = np.logical_and.reduce([clean] + [results[l]["correct"] for l in specs])
  rows = []
  for label, spec in specs.items():
    spec = dict(spec)
    fooled = clean & ~results[label]["correct"]
    rows.append({
        "attack": label, "name": spec.get("name"), "norm": threat_norm(spec),
        "eps": float(spec["eps"]) if "eps" in spec else None,
        "accuracy": float(results[label]["correct"].mean()),
        "median_l2": float(np.median(results[label]["l2"][fooled])) if fooled.any() else None,
        "settings": {k: v for k, v in spec.items() if k not in ("name", "norm", "eps")}})
  return {"n_examples": int(len(clean)), "clean_accuracy": float(clean.mean()),
          "results": rows, "worst_case_accuracy": float(worst.mean())}


def evaluate(apply_fn, variables, x, y, specs, *, key, batch_size=500, mesh=None,
             source=None, sanity=False, certified=False):
  """Evaluates attack `specs` (`{label: spec}`) on (x, y) and returns `report`.

  With `sanity`, the report's "sanity" entry holds `sanity_checks` run on the
  first `SANITY_EXAMPLES` examples. Other arguments: `per_example_results`.
  """
  def run(x, y, specs):
    return report(per_example_results(
        apply_fn, variables, x, y, build_attacks(specs), key=key,
        batch_size=batch_size, mesh=mesh, source=source), specs)

  rep = run(x, y, specs)
  if sanity:
    subset = lambda s: run(x[:SANITY_EXAMPLES], y[:SANITY_EXAMPLES], s)
    rep["sanity"] = sanity_checks(rep, subset, specs, x.shape[1:], certified=certified)
  return rep


def scaled(spec, factor):
  """The attack spec with its eps (and step size, if set) multiplied by `factor`."""
  spec = dict(spec)
  spec["eps"] = spec["eps"] * factor
  if spec.get("step_size") is not None:
    spec["step_size"] = spec["step_size"] * factor
  return spec


def eps_curve(evaluate_specs, spec, eps_values):
  """Accuracy of attack `spec` at each eps in `eps_values`: [(eps, accuracy)].

  `evaluate_specs(specs) -> report` runs the evaluation.
  """
  specs = {f"eps={e:g}": scaled(spec, e / spec["eps"]) for e in eps_values}
  rep = evaluate_specs(specs)
  return [(e, r["accuracy"]) for e, r in zip(eps_values, rep["results"])]


def large_eps(norm, input_shape):
  """An eps at which any image can be moved to a grey one (so gradient-based
  attacks should fool an undefended model): 0.5 in L-inf, 0.5 sqrt(d) in L2."""
  if norm == "l2":
    return LARGE_LINF_EPS * math.sqrt(math.prod(input_shape))
  return LARGE_LINF_EPS


def sanity_checks(rep, evaluate_specs, specs, input_shape, *, certified=False):
  """Runs and returns the sanity checks of a report: [{"check", "passed", "detail"}].

  1. No attack's accuracy exceeds the clean accuracy.
  2. Accuracy does not rise with eps: at eps / 2 it is at least that at eps
     (up to one example in a hundred for the attacks' randomness).
  3. At a large eps (`large_eps`) accuracy is near 0 (<= 10 %), unless the
     model has a certified defence (`certified`).
  `evaluate_specs(specs) -> report` runs an evaluation (on a subset).
  """
  results = []
  clean = rep["clean_accuracy"]
  for row in rep["results"]:
    results.append({"check": f"{row['attack']}: accuracy <= clean accuracy",
                    "passed": row["accuracy"] <= clean,
                    "detail": f"{row['accuracy']:.4f} vs clean {clean:.4f}"})
  swept = {l: s for l, s in specs.items() if "eps" in s and s.get("name") != "cw_l2"}
  if not swept:
    return results
  check_specs = {}
  for label, spec in swept.items():
    check_specs[f"{label}@half"] = scaled(spec, 0.5)
    check_specs[f"{label}@full"] = spec
    check_specs[f"{label}@large"] = scaled(
        spec, large_eps(threat_norm(spec), input_shape) / spec["eps"])
  by_label = {r["attack"]: r for r in evaluate_specs(check_specs)["results"]}
  for label, spec in swept.items():
    half, full, large = (by_label[f"{label}@{k}"]["accuracy"]
                         for k in ("half", "full", "large"))
    results.append({"check": f"{label}: accuracy does not rise with eps",
                    "passed": full <= half + 0.01,
                    "detail": f"eps {spec['eps'] / 2:g}: {half:.4f}, eps {spec['eps']:g}: {full:.4f}"})
    if not certified:
      eps = large_eps(threat_norm(spec), input_shape)
      results.append({"check": f"{label}: accuracy near 0 at a large eps",
                      "passed": large <= NEAR_ZERO,
                      "detail": f"eps {eps:g}: {large:.4f} (expected <= {NEAR_ZERO})"})
  return results


def lipschitz_certificate(apply_fn, variables, x, y, radii, *, batch_size=500):
  """Certified L2 accuracy of a network from a bound on its Lipschitz constant.

  With L = `spectral.lipschitz_bound(apply_fn, variables, ...)` (an upper
  bound on the L2 Lipschitz constant of the logits), example i is certified
  at radius r when it is classified correctly and
  margin_i / (sqrt(2) L) > r, margin_i the top logit minus the second: no
  perturbation of L2 norm <= r changes its prediction (Tsuzuku, Sato &
  Sugiyama 2018). The guarantee is deterministic (no probability, unlike
  randomized smoothing) and holds for any attack.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits`, inference mode, not jitted.
    variables: the model's variables.
    x, y: images in [0, 1] [N, ...] and labels [N].
    radii: the L2 radii at which to report certified accuracy.
    batch_size: examples per forward pass.

  Returns:
    `{"lipschitz_bound": L, "median_radius": float (0 for misclassified
    examples), "certified": [{"radius": r, "accuracy": float}]}`.
  """
  checks.check_images(x)
  bound = spectral.lipschitz_bound(apply_fn, variables, x.shape[1:])
  logits_of = jax.jit(apply_fn)
  logits = np.concatenate([np.asarray(logits_of(variables, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])
  radius = np.asarray(spectral.certified_radius(logits, bound, np.asarray(y)))
  return {"lipschitz_bound": float(bound), "median_radius": float(np.median(radius)),
          "certified": [{"radius": float(r), "accuracy": float(np.mean(radius > r))}
                        for r in radii]}


def lipschitz_sanity(rep, certificate):
  """Sanity checks of a Lipschitz certificate against the same model's attacks:
  no L2 attack may do better than the certificate allows, i.e. its accuracy
  at eps is at least the certified accuracy at eps."""
  certified = {c["radius"]: c["accuracy"] for c in certificate["certified"]}
  return [{"check": f"{row['attack']}: accuracy >= Lipschitz-certified accuracy",
           "passed": row["accuracy"] >= certified[row["eps"]],
           "detail": f"eps {row['eps']:g}: {row['accuracy']:.4f} vs certified "
                     f"{certified[row['eps']]:.4f}"}
          for row in rep["results"] if row["norm"] == "l2" and row["eps"] in certified]


def format_lipschitz(certificate, what):
  """A Lipschitz certificate as text: the bound and a table of certified accuracy."""
  lines = [f"Lipschitz certificate of {what} (Tsuzuku et al. 2018): L <= "
           f"{certificate['lipschitz_bound']:.4g}, median certified L2 radius "
           f"{certificate['median_radius']:.4g}", "",
           "| L2 radius | certified accuracy |", "| --- | --- |"]
  lines += [f"| {c['radius']:g} | {100 * c['accuracy']:.2f} % |"
            for c in certificate["certified"]]
  return "\n".join(lines)


def format_sanity(results):
  """The sanity checks as text, with a warning naming gradient masking on failure."""
  lines = ["Sanity checks:"]
  for r in results:
    lines.append(f"  [{'ok' if r['passed'] else 'FAILED'}] {r['check']} ({r['detail']})")
  if not all(r["passed"] for r in results):
    lines.append("WARNING: a sanity check failed. Gradient masking (obfuscated or "
                 "noisy gradients) is a likely cause: the reported robustness may be "
                 "overestimated. Try APGD, more steps or restarts, or transfer attacks.")
  return "\n".join(lines)


def format_table(rep):
  """A markdown table of a `report`: clean, each attack, and the worst case."""
  lines = ["| attack | norm | eps | settings | accuracy | median L2 of successes |",
           "| --- | --- | --- | --- | --- | --- |",
           f"| clean | | | | {100 * rep['clean_accuracy']:.2f} % | |"]
  for r in rep["results"]:
    settings = ", ".join(f"{k}={v}" for k, v in {"name": r["name"], **r["settings"]}.items())
    eps = "" if r["eps"] is None else f"{r['eps']:.4g}"
    l2 = "" if r["median_l2"] is None else f"{r['median_l2']:.4f}"
    lines.append(f"| {r['attack']} | {r['norm'] or ''} | {eps} | {settings} | "
                 f"{100 * r['accuracy']:.2f} % | {l2} |")
  if rep["results"]:
    lines.append(f"| worst case | | | per example, over all attacks | "
                 f"{100 * rep['worst_case_accuracy']:.2f} % | |")
  lines.append(f"\n{rep['n_examples']} examples")
  return "\n".join(lines)


def plot_sweep(curves, path):
  """PNG of accuracy against eps, one line per attack: `curves = {label: [(eps, acc)]}`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for label, curve in curves.items():
    eps, acc = zip(*curve)
    ax.plot(eps, [100 * a for a in acc], marker="o", label=label)
  ax.set_xlabel("eps")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
