"""Writes jaxrobust/zoo/table.py: RobustBench's entries and what jaxrobust loads of them.

Reads a RobustBench repository (a git directory, read with `git show`):
`robustbench/model_zoo/{cifar10,cifar100,imagenet}.py` for each entry's
constructor and `model_info/<dataset>/<threat>/<entry>.json` for the
leaderboard's facts. The constructor's source (the lambda, or the class it
names with its bases and `__init__`) is matched against the rules in
`RULES`; an entry no rule matches is recorded with the class RobustBench
builds it from as its missing architecture.

  python scripts/zoo_table.py /path/to/robustbench/.git > jaxrobust/zoo/table.py

With `--markdown`, prints the rows of docs/zoo.md's table of every entry
from the generated table (`jaxrobust.zoo.ENTRIES`) instead:

  python scripts/zoo_table.py --markdown
"""

import ast
from collections.abc import Iterator
from typing import Any
import json
import re
import subprocess
import sys

DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
THREATS = {"linf": "Linf", "l2": "L2", "common_corruptions": "corruptions"}
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMED = {"CIFAR10": CIFAR10, "CIFAR100": CIFAR100}

# (pattern on the constructor's source, architecture); the first match wins. A
# template's {d} and {w} are the pattern's groups "d" and "w" (defaults 28, 10).
RULES = [
  (r"^BoostingWideResNet\(\)", "wrn-34-20-cosine"),  # RobustBench's own defaults
  (  # per-image standardisation (Ding2020MMANet)
    r"(?s)(?<![A-Za-z])WideResNet\((?=[^)]*depth=(?P<d>\d+))(?=[^)]*widen_factor=(?P<w>\d+)).*"
    r"x\.std\(dim=\(1, 2, 3\)",
    "wrn-{d}-{w}-per-image",
  ),
  (r"x\.std\(dim=", None),
  (r"pssilu_wrn_(?P<d>\d+)_(?P<w>\d+)\(", "wrn-{d}-{w}-pssilu"),
  (r"get_sparse_model\(\s*'ra_wrn_70_16',\s*dataset='cifar-10-", "ra-wrn-70-16-meansparse"),
  (
    r"get_sparse_model\(\s*'wrn_(?P<d>\d+)_(?P<w>\d+)',\s*dataset='cifar-",
    "dm-wrn-{d}-{w}-meansparse",
  ),
  (r"get_robustarch_model\('ra_wrn70_16'\)", "ra-wrn-70-16"),
  (r"ResNet\(BottleneckChen2020AdversarialNet, \[3, 4, 6, 3\]\)", "preact-resnet-50-x3"),
  (r"robust_resnet\.get_model\('WRN-A4'\)", "wrn-a4"),
  (r"get_composite_model|get_nonlin_mixed|get_sparse_model|Sparsified|sodef|SODEF", None),
  (r"Meansparse|MeanSparse|timm\.|xcit|Swin|ConvNeXt|convnext|RaWideResNet|get_robustarch", None),
  (r"DMWideResNet\((?=[^)]*depth=(?P<d>\d+))?(?=[^)]*width=(?P<w>\d+))?", "dm-wrn-{d}-{w}"),
  (r"DMPreActResNet\((?![^)]*depth=34)", "dm-preact-resnet-18"),
  (
    r"RobustWideResNet\([^)]*channel_configs=\[(?P<c>[\d, ]+)\][^)]*depth_configs=\[(?P<n>[\d, ]+)\]",
    "robust-wrn-{c}-{n}",
  ),
  (
    r"(?<![A-Za-z])WideResNet\((?=[^)]*depth=(?P<d>\d+))?(?=[^)]*widen_factor=(?P<w>\d+))?",
    "wrn-{d}-{w}",
  ),
  (r"PreActResNet\(\s*PreActBlockV2,\s*\[2, 2, 2, 2\][^)]*bn_before_fc=True", "preact-resnet-18"),
  (
    r"PreActResNet\(\s*PreActBlock,\s*\[2, 2, 2, 2\][^)]*bn_before_fc=True[^)]*out_shortcut=True",
    "preact-resnet-18",
  ),
  (r"PreActResNet\(\s*PreActBlock,\s*\[2, 2, 2, 2\][^)]*bn_before_fc=True", None),
  (
    r"PreActResNet18\(\)|PreActResNet\(\s*PreActBlock,\s*\[2, 2, 2, 2\][^)]*\)",
    "preact-resnet-18-plain",
  ),
  (r"ResNet18\(\)|ResNet\(\s*BasicBlock,\s*\[2, 2, 2, 2\]", "resnet-18"),
  (r"ResNet50\(\)|ResNet\(\s*Bottleneck,\s*\[3, 4, 6, 3\]\s*\)", "resnet-50-cifar"),
  (r"pt_models\.resnet50\((pretrained=True)?\)", "resnet-50"),
  (r"pt_models\.resnet18\(\)", "resnet-18-imagenet"),
  (r"pt_models\.(wide_resnet50_2\(\)|resnet50\(width_per_group=64 \* 2\))", "wide-resnet-50-2"),
]
WRN_SUPERS = ("WideResNet.__init__", "super(")


def git_show(repo: str, path: str) -> str:
  return subprocess.run(
    ["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
  ).stdout


def constructor_source(tree: ast.Module, text: str, node: ast.expr) -> tuple[str, str]:
  """(the source the rules read, the class or callable RobustBench builds the entry with)."""
  src = ast.get_source_segment(text, node) or ""
  if isinstance(node, ast.Name):
    for cls in tree.body:
      if isinstance(cls, ast.ClassDef) and cls.name == node.id:
        bases = ", ".join(ast.unparse(b) for b in cls.bases)
        # the base class called with the super call's arguments reads as a constructor
        init = ast.get_source_segment(text, cls) or ""
        call = re.search(r"super\([^)]*\)\.__init__\((.*?)\)\s*$", init, re.S | re.M)
        args = call.group(1) if call else ""
        for name, default in init_defaults(cls).items():  # depth=depth -> depth=34
          args = re.sub(rf"=\s*{name}\b", f"={default}", args)
        return f"{bases}({args}) {init}", node.id
    return f"{node.id}()", node.id  # a class of the architectures, called without arguments
  return src, builder_name(src)


def init_defaults(cls: ast.ClassDef) -> dict[str, str]:
  """`{argument: default's source}` of a class's `__init__`."""
  for node in cls.body:
    if isinstance(node, ast.FunctionDef) and node.name == "__init__":
      args = node.args.args[len(node.args.args) - len(node.args.defaults) :]
      return {a.arg: ast.unparse(d) for a, d in zip(args, node.args.defaults)}
  return {}


def builder_name(src: str) -> str:
  """The network a constructor's source builds: torchvision's, timm's, or its first callee."""
  flat = re.sub(r"\s+", "", src)
  for pattern, template in (
    (r"pt_models\.(\w+\([^)]*\))", "torchvision {}"),
    (r"timm\.create_model\('([^']+)'", "timm {}"),
    (r"(?<!normalize_)(?<!normalize_timm_)(\w+_models?)\(", "{}"),
    (r"([A-Za-z_][\w.]*)\(", "{}"),
  ):
    m = re.search(pattern, flat)
    if m:
      return template.format(m.group(1))
  return flat


def classify(src: str, builder: str) -> tuple[str | None, str]:
  """(our architecture or None, the missing architecture or "")."""
  for pattern, arch in RULES:
    m = re.search(pattern, src)
    if m:
      if arch is None:
        break
      groups = {k: v for k, v in m.groupdict().items() if v}
      sizes = {k: "-".join(re.findall(r"\d+", groups.get(k, ""))) for k in "cn"}
      return arch.format(d=groups.get("d", 28), w=groups.get("w", 10), **sizes), ""
  return None, builder


def normalisation(src: str, dataset: str, imported: str = "") -> list[list[float]] | str:
  """The input normalisation the constructor states: `[mean, std]`, "checkpoint" or "none".

  `imported` is the source of the class RobustBench imports from its
  architectures (e.g. `BoostingWideResNet`), where the entry names one.
  A class's registered "mu" and "sigma" are read from its source: RobustBench
  loads the files of its known failing models without them (strict=False),
  and the class's values then apply. "checkpoint" only where a class
  registers them with values this script cannot read.
  """
  m = re.search(r"mean=(CIFAR10{1,2}0?)_MEAN", src)
  if m:
    return [list(v) for v in NAMED[m.group(1)]]
  if re.search(r"DM(WideResNet|PreActResNet)\(|get_robustarch_model\('ra_wrn70_16'\)", src):
    return [list(v) for v in CIFAR10]
  sparse = re.search(r"get_sparse_model\(\s*'(ra_)?wrn_\d+_\d+',\s*dataset='cifar-(10|100)-", src)
  if sparse:  # the classes get_sparse_model builds: DeepMind's statistics of the data set
    return [list(v) for v in (CIFAR10 if sparse.group(2) == "10" else CIFAR100)]
  if "normalize_model" in src and dataset == "imagenet":
    return [list(v) for v in IMAGENET]
  if "robust_resnet.get_model('WRN-A4')" in src:  # its class's buffers; the file lacks them
    return [list(v) for v in CIFAR10]
  buffers = registered_buffers(f"{src}\n{imported}")
  if buffers is not None:
    return buffers
  if "x = 2. * x - 1." in src:
    return [[0.5] * 3, [0.5] * 3]
  if re.search(r"register_buffer\(\s*['\"]mu['\"]", f"{src}\n{imported}"):
    return "checkpoint"
  return "none"


def registered_buffers(src: str) -> list[list[float]] | None:
  """`[mu, sigma]` of a class source's `register_buffer('mu', torch.tensor([...]).view(...))`
  (a list literal, or one repeated: `[0.5] * 3`), or None where either is not such."""
  values = []
  for name in ("mu", "sigma"):
    m = re.search(
      rf"register_buffer\(\s*['\"]{name}['\"],\s*torch\.tensor\(\s*([^()]*?)\s*\)\s*\.view\(", src
    )
    if m is None:
      return None
    try:
      value = literal_floats(ast.parse(m.group(1), mode="eval").body)
    except (SyntaxError, ValueError):
      return None
    values.append(value)
  return values


def literal_floats(node: ast.expr) -> list[float]:
  """The floats of a list literal, or of one repeated (`[0.5] * 3`)."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
    times = ast.literal_eval(node.right)
    if not isinstance(times, int):
      raise ValueError(f"not a repeat count: {ast.unparse(node.right)}")
    return literal_floats(node.left) * times
  value = ast.literal_eval(node)
  if not (isinstance(value, list) and all(isinstance(v, int | float) for v in value)):
    raise ValueError(f"not a list of numbers: {ast.unparse(node)}")
  return [float(v) for v in value]


def imported_class(repo: str, tree: ast.Module, name: str) -> str:
  """The source of class `name` that the zoo file imports from RobustBench's architectures."""
  for stmt in tree.body:
    if isinstance(stmt, ast.ImportFrom) and any(a.name == name for a in stmt.names):
      module = stmt.module or ""
      if not module.startswith("robustbench.model_zoo.architectures."):
        continue
      text = git_show(repo, module.replace(".", "/") + ".py")
      for cls in ast.parse(text).body:
        if isinstance(cls, ast.ClassDef) and cls.name == name:
          return ast.get_source_segment(text, cls) or ""
  return ""


def entries(repo: str, dataset: str) -> Iterator[tuple[str, str, str, str, str]]:
  text = git_show(repo, f"robustbench/model_zoo/{dataset}.py")
  tree = ast.parse(text)
  for stmt in tree.body:
    if not (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)):
      continue
    threat = THREATS.get(stmt.targets[0].id)
    if threat is None or not isinstance(stmt.value, ast.Call) or not stmt.value.args:
      continue
    for item in stmt.value.args[0].elts:  # type: ignore[attr-defined]
      name = ast.literal_eval(item.elts[0])
      spec = item.elts[1]
      model = next(v for k, v in zip(spec.keys, spec.values) if ast.literal_eval(k) == "model")
      src, builder = constructor_source(tree, text, model)
      imported = imported_class(repo, tree, model.id) if isinstance(model, ast.Name) else ""
      yield name, threat, src, builder, imported


def info(repo: str, dataset: str, threat: str, name: str) -> dict:
  try:
    return json.loads(git_show(repo, f"model_info/{dataset}/{threat}/{name}.json"))
  except subprocess.CalledProcessError:
    return {}


def number(value: Any) -> float | None:
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def main(repo: str) -> None:
  commit = subprocess.run(
    ["git", "-C", repo, "log", "-1", "--format=%H %cs"], capture_output=True, text=True, check=True
  ).stdout.split()
  rows = []
  for dataset in DATASETS:
    for name, threat, src, builder, imported in entries(repo, dataset):
      arch, missing = classify(src, builder)
      facts = info(repo, dataset, threat, name)
      rows.append(
        (
          name,
          dataset,
          threat,
          facts.get("eps"),
          arch,
          missing,
          normalisation(src, dataset, imported),
          facts.get("name", ""),
          facts.get("link", ""),
          number(facts.get("clean_acc")),
          number(facts.get("autoattack_acc", facts.get("corruptions_acc"))),
        )
      )
  print(HEADER.format(commit=commit[0], date=commit[1]))
  print("# fmt: off")
  print("ENTRIES: tuple[Entry, ...] = (")
  for row in rows:
    print(f"  Entry{row!r},")
  print(")")
  print("# fmt: on")


HEADER = '''"""RobustBench's model zoo: every entry, its leaderboard facts and its jaxrobust architecture.

Generated by `python scripts/zoo_table.py <RobustBench git dir>` from
RobustBench's repository at commit {commit} ({date}):
the architectures from `robustbench/model_zoo/<dataset>.py` (each entry's
constructor), the facts from `model_info/<dataset>/<threat>/<entry>.json`.
Accuracies are the leaderboard's, in percent (AutoAttack's for L-inf and L2,
the corruptions' mean for corruptions). Do not edit by hand.
"""

# ruff: noqa: E501

from typing import NamedTuple


class Entry(NamedTuple):
  """One RobustBench entry.

  Attributes:
    name: RobustBench's name of the entry.
    dataset: "cifar10", "cifar100" or "imagenet".
    threat: "Linf", "L2" or "corruptions".
    eps: the radius as RobustBench writes it ("8/255"), None for corruptions.
    arch: the jaxrobust architecture (`interop.architecture`), or None.
    missing: the architecture RobustBench builds it with, when `arch` is None.
    normalisation: `[mean, std]` (the constructor's, or the mu and sigma its
      class registers), "checkpoint" (buffers only the checkpoint holds) or "none".
    paper: the paper's title.
    link: the paper's address.
    clean: the leaderboard's clean accuracy (percent).
    robust: the leaderboard's robust accuracy (percent).
  """

  name: str
  dataset: str
  threat: str
  eps: str | None
  arch: str | None
  missing: str
  normalisation: list[list[float]] | str
  paper: str
  link: str
  clean: float | None
  robust: float | None

'''


def markdown() -> None:
  """Prints docs/zoo.md's rows: entry, eps, architecture, normalisation, clean, robust."""
  from jaxrobust import zoo  # noqa: PLC0415

  for e in zoo.ENTRIES:
    arch = f"`{e.arch}`" if e.arch else f"missing: {e.missing}"
    norm = e.normalisation
    if isinstance(norm, list):
      norm = "mean " + ", ".join(str(v) for v in norm[0])
    print(f"| {zoo.key(e)} | {e.eps or '-'} | {arch} | {norm} | {e.clean} | {e.robust} |")


if __name__ == "__main__":
  if sys.argv[1] == "--markdown":
    markdown()
  else:
    main(sys.argv[1])
