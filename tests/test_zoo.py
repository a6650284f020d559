"""RobustBench's zoo by name (`jaxrobust.zoo`): the table, its coverage, loading and evaluating an entry.

The architectures themselves are compared with RobustBench's definitions in
tests/test_zoo_architectures.py.
"""

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrobust as jr
from jaxrobust import checks, interop, zoo
from robustbench_files import ATOL, randomized, rb_module, rb_zoo_class

torch = pytest.importorskip("torch")


CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
SIDE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def test_every_entry_has_a_unique_name_and_the_leaderboards_facts() -> None:
  keys = [zoo.key(e) for e in zoo.ENTRIES]
  assert len(keys) == len(set(keys)) == 206
  for e in zoo.ENTRIES:
    assert e.dataset in CLASSES and e.threat in ("Linf", "L2", "corruptions")
    assert (e.arch is None) != (e.missing == "")
    if e.threat != "corruptions":
      assert (
        0 < zoo.eps(e) <= 0.5
        and e.robust is not None
        and e.clean is not None
        and e.clean > e.robust
      )
  carmon = zoo.find("Carmon2019Unlabeled")
  assert (carmon.arch, carmon.eps, carmon.clean, carmon.robust) == (
    "wrn-28-10",
    "8/255",
    89.69,
    59.53,
  )
  assert zoo.find("models/cifar10/L2/Standard.pt").threat == "L2"


def test_coverage_counts_the_loadable_entries() -> None:
  cov = zoo.coverage(("cifar10",), ("Linf", "L2"))
  assert cov == {"cifar10/Linf": (69, 76), "cifar10/L2": (21, 21)}  # 90 of 97: 93 %
  loaded = sum(done for done, _ in cov.values())
  assert loaded >= 0.9 * sum(total for _, total in cov.values())
  resnet50s = [  # torchvision's ResNet-50s of ImageNet, the loadable and the missing ones
    e
    for e in zoo.ENTRIES
    if e.dataset == "imagenet" and (e.arch == "resnet-50" or "resnet50(" in e.missing)
  ]
  assert len(resnet50s) == 12 and all(e.arch is not None for e in resnet50s)  # L-inf, corruptions
  text = zoo.format_list()
  assert all(zoo.key(e) in text for e in zoo.ENTRIES) and "cifar10/Linf: 69 of 76 load" in text


def test_unsupported_entries_say_which_architecture_is_missing() -> None:
  assert zoo.status("cifar10/Linf/Ding2020MMA") == "loads as wrn-28-4-per-image"
  assert zoo.status("imagenet/Linf/Peng2023Robust").startswith("not supported")
  assert "get_robustarch_model" in zoo.status("imagenet/Linf/Peng2023Robust")
  assert zoo.status("cifar10/Linf/Wong2020Fast") == "loads as preact-resnet-18-plain"
  with pytest.raises(checks.InputError, match="'Standard' is held by cifar10/Linf/Standard"):
    zoo.find("Standard")
  with pytest.raises(checks.InputError, match="no zoo entry"):
    zoo.find("Nobody2099")
  with pytest.raises(checks.InputError, match="get_robustarch_model"):
    zoo.load_entry("imagenet/Linf/Peng2023Robust", {})


def _architectures() -> list[tuple[str, str]]:
  return sorted({(e.arch, e.dataset) for e in zoo.ENTRIES if e.arch is not None})


@pytest.mark.parametrize("arch, dataset", _architectures())
def test_every_supported_architecture_builds_at_full_size(arch: str, dataset: str) -> None:
  name, settings = interop.architecture(arch)
  model = jr.models.create(
    name, num_classes=CLASSES[dataset], mean=(0,) * 3, std=(1,) * 3, **settings
  )
  side = SIDE[dataset]
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  n_flax = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
  with torch.device("meta"):
    net = interop.twin(name, num_classes=CLASSES[dataset], mean=(0,) * 3, std=(1,) * 3, **settings)
  assert n_flax == sum(p.numel() for p in net.parameters())
  keys = {k for k, _, _ in interop.layout(model, shapes["params"])}
  assert keys == {k for k in net.state_dict() if k not in ("mean", "std")}


def _full_size_checkpoint(arch: str, classes: int) -> dict[str, Any]:
  name, settings = interop.architecture(arch)
  torch.manual_seed(0)
  net = interop.twin(name, num_classes=classes, mean=(0,) * 3, std=(1,) * 3, **settings)
  return {k: v for k, v in net.state_dict().items() if k not in ("mean", "std")}


def test_a_checkpoint_loads_by_entry_and_a_wrong_one_is_named_in_one_line() -> None:
  state = _full_size_checkpoint("preact-resnet-18-plain", 10)
  model, variables = zoo.load_entry("cifar10/Linf/Wong2020Fast", {"model": state})
  assert model.final_bn is False and model.mean == (0.4914, 0.4822, 0.4465)  # Wong2020FastNet's
  with pytest.raises(checks.InputError) as error:
    zoo.load_entry("cifar10/Linf/Rice2020Overfitting", state)  # a WideResNet-34-20 entry
  message = str(error.value)
  assert "\n" not in message
  assert "cifar10/Linf/Rice2020Overfitting (architecture wrn-34-20)" in message
  assert "'fc.weight'" in message  # the first key the architecture needs


def test_evaluate_entry_sets_the_leaderboards_number_beside_ours() -> None:
  state = _full_size_checkpoint("preact-resnet-18-plain", 10)
  model, variables = zoo.load_entry("cifar10/Linf/Wong2020Fast", state)
  x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  wrong = (np.asarray(model.apply(variables, x)).argmax(-1) + 1) % 10  # nothing to attack
  got = zoo.evaluate_entry("cifar10/Linf/Wong2020Fast", state, x=x, y=wrong, batch_size=4)
  assert (got.n, got.clean, got.robust, got.stderr) == (4, 0.0, 0.0, 0.0)
  assert got.leaderboard == 43.21 and got.difference == pytest.approx(-43.21)
  assert "leaderboard 43.21 %" in got.format() and "n=4" in got.format()
  half = zoo.result(zoo.find("cifar10/Linf/Wong2020Fast"), 100, 0.8, 0.5)
  assert half.stderr == pytest.approx(5.0) and half.difference == pytest.approx(50 - 43.21)
  with pytest.raises(checks.InputError, match="not an AutoAttack entry"):
    zoo.evaluate_entry("cifar10/corruptions/Standard", state)


def test_eval_zoo_list_and_a_checkpoint_that_does_not_fit(cli: Any, tmp_path: Path) -> None:
  listed = cli("eval.py", "--zoo", "list")
  assert listed.returncode == 0, listed.stderr
  counts = zoo.coverage()
  loaded, total = counts["cifar10/Linf"]
  assert f"cifar10/Linf: {loaded} of {total} load" in listed.stdout
  assert "cifar10/Linf/Wong2020Fast" in listed.stdout
  path = tmp_path / "preact.pt"
  torch.save({"model": _full_size_checkpoint("preact-resnet-18-plain", 10)}, path)
  wrong = cli("eval.py", "--zoo", "cifar10/Linf/Rice2020Overfitting", "--torch-checkpoint", path)
  assert wrong.returncode == 2
  (line,) = wrong.stderr.strip().splitlines()
  assert line.startswith("error: ") and "Rice2020Overfitting (architecture wrn-34-20)" in line
  assert "Traceback" not in wrong.stderr


def test_an_ensemble_entry_loads_from_one_file_a_branch(tmp_path: Path) -> None:
  torch.manual_seed(0)
  net: Any = interop.twin("preact_resnet50_ensemble", num_classes=10, mean=(0,) * 3, std=(1,) * 3)
  paths = []
  for i, branch in enumerate(net.models):  # load_model's models/cifar10/Linf/<entry>_m<i>.pt
    paths.append(tmp_path / f"Chen2020Adversarial_m{i}.pt")
    torch.save({"state_dict": branch.state_dict()}, paths[-1])
  model, variables = zoo.load_entry("cifar10/Linf/Chen2020Adversarial", paths)
  assert model.mean == pytest.approx((0.485, 0.456, 0.406))  # the class's, in no file
  kernel = variables["params"]["branch2"]["conv1"]["kernel"]
  np.testing.assert_array_equal(
    kernel, net.models[1].conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  )
  for path in (tmp_path / "Chen2020Adversarial.pt", paths[0]):  # RobustBench's names, found
    model, again = zoo.load_entry("cifar10/Linf/Chen2020Adversarial", path)
    np.testing.assert_array_equal(again["params"]["branch2"]["conv1"]["kernel"], kernel)
  with pytest.raises(checks.InputError, match="Chen2020Adversarial"):
    zoo.load_entry("cifar10/Linf/Chen2020Adversarial", paths[:2])  # a branch missing


def test_a_meansparse_model_round_trips_through_safetensors(tmp_path: Path) -> None:
  settings: dict[str, Any] = dict(stem_width=4, depths=(1, 1, 1), widths=(8, 8, 8), meansparse=True)
  net: Any = interop.twin(
    "ra_wide_resnet", num_classes=3, mean=(0.5,) * 3, std=(0.3,) * 3, **settings
  )
  with torch.no_grad():
    for i, m in enumerate(m for m in net.modules() if type(m).__name__ == "MeanSparse"):
      m.threshold.fill_(0.25 + 0.1 * i)  # the scalar thresholds, 0-d tensors
  model, variables = interop.from_torch(net.state_dict(), "ra_wide_resnet", **settings)
  interop.save_checkpoint(tmp_path / "m.safetensors", model, variables)
  checkpoint = interop.load_checkpoint(tmp_path / "m.safetensors")
  found = interop.checkpoint_architecture(checkpoint)
  assert found is not None
  loaded, back = interop.from_torch(checkpoint, found[0], **found[1])
  assert back["batch_stats"]["MeanSparse_0"]["threshold"].shape == ()
  as_lists = lambda tree: jax.tree.map(lambda a: np.asarray(a).tolist(), tree)
  assert as_lists(back) == as_lists(variables)  # the same tree, shapes and values
  assert loaded.meansparse and tuple(loaded.widths) == (8, 8, 8)


# (entry, its class in RobustBench's model_zoo/cifar10.py, {name the class uses: its module})
WONG = (
  "cifar10/Linf/Wong2020Fast",
  "Wong2020FastNet",
  {"PreActResNet": "resnet", "PreActBlock": "resnet"},
)
ENGSTROM = (
  "cifar10/L2/Engstrom2019Robustness",
  "Engstrom2019RobustnessNet",
  {"ResNet": "resnet", "Bottleneck": "resnet"},
)


@pytest.mark.parametrize("entry, cls, names", [WONG, ENGSTROM], ids=["Wong", "Engstrom"])
def test_a_file_without_mu_and_sigma_gives_the_robustbench_classs_logits(
  entry: str, cls: str, names: dict[str, str], tmp_path: Path
) -> None:
  # RobustBench loads these files without the buffers (strict=False): its class's values apply
  scope = {name: getattr(rb_module(module, tmp_path), name) for name, module in names.items()}
  net = randomized(rb_zoo_class("cifar10", cls, **scope)())
  buffers = [net.mu.reshape(-1).numpy(), net.sigma.reshape(-1).numpy()]
  normalisation = zoo.find(entry).normalisation
  assert isinstance(normalisation, list)
  np.testing.assert_allclose(np.array(normalisation), buffers, rtol=1e-6, atol=0)
  state = {k: v for k, v in net.state_dict().items() if k not in ("mu", "sigma")}
  model, variables = zoo.load_entry(entry, state)
  x = np.random.default_rng(3).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(interop.nhwc_to_nchw(x)).numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, atol=ATOL, rtol=0)
  with_buffers, _ = zoo.load_entry(entry, net.state_dict())  # the class's own buffers agree
  assert with_buffers == model


def test_a_file_whose_mu_differs_from_the_entrys_is_refused_naming_the_key() -> None:
  state = _full_size_checkpoint("preact-resnet-18-plain", 10)
  wong_mu = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)  # Wong2020FastNet's
  sigma = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
  with pytest.raises(checks.InputError) as error:
    zoo.load_entry("cifar10/Linf/Wong2020Fast", {**state, "mu": wong_mu * 0 + 0.5, "sigma": sigma})
  message = str(error.value)
  assert "\n" not in message and "cifar10/Linf/Wong2020Fast" in message
  assert "buffer 'mean' (RobustBench's 'mu') holds (0.5, 0.5, 0.5)" in message
  assert "not the mean (0.4914, 0.4822, 0.4465) given" in message
  model, _ = zoo.load_entry("cifar10/Linf/Wong2020Fast", {**state, "mu": wong_mu, "sigma": sigma})
  assert (model.mean, model.std) == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def test_no_entry_leaves_its_normalisation_to_the_checkpoint() -> None:
  # every class that registers mu and sigma does so with values scripts/zoo_table.py reads
  assert [zoo.key(e) for e in zoo.ENTRIES if e.normalisation == "checkpoint"] == []
  for e in zoo.ENTRIES:
    if isinstance(e.normalisation, list):
      mean, std = e.normalisation
      assert len(mean) == len(std) == 3 and all(0 < v < 1 for v in (*mean, *std))
