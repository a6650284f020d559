"""PyTorch models in, Flax models out: checkpoints of RobustBench's zoo and others.

`from_torch(state_dict, arch)` returns a jaxrobust model and its variables
that compute what the PyTorch model with that `state_dict` computes;
`to_torch(model, variables)` the PyTorch twin (`torch_twins`) of a
jaxrobust model. Every model takes NHWC images in [0, 1] (the twins NCHW)
and normalises them inside. The zoo's architectures pad as their PyTorch
definition does (`models.PADDINGS`: PyTorch's `padding=1` pads a stride-2
3x3 convolution (1, 1) where XLA's SAME pads (0, 1)), and the twins pad as
the Flax model does.

Modules, one job each:

* `architectures`: architecture names (RobustBench's "wrn-28-10", ...) and
  what a model's weights imply;
* `layouts`: which PyTorch key holds which Flax variable, and how the
  arrays map (HWIO <-> OIHW, ...);
* `state_dicts`: PyTorch state dicts as numpy arrays, both ways (no
  PyTorch needed);
* `pytorch`: the twins and torch tensors (imports PyTorch when called);
* `files`: `.pt`/`.pth` and `.safetensors` checkpoints;
* `flax_files`: converted models as orbax + JSON directories, read without
  PyTorch;
* `torch_twins`, `torch_twins_zoo`, `torch_twins_entries`: the PyTorch
  twins (they import PyTorch: reach them through `twin`).

PyTorch is optional (`pip install "jaxrobust[torch]"`): `import jaxrobust`
never imports it, and its absence raises `InputError` where it is needed.
"""

from jaxrobust.interop import architectures, files, flax_files, layouts, pytorch, state_dicts
from jaxrobust.interop.architectures import (
  ARCHS,
  ZOO,
  architecture,
  input_hw,
  model_name,
  model_settings,
)
from jaxrobust.interop.files import (
  check_export_path,
  checkpoint_architecture,
  load_checkpoint,
  read_safetensors,
  save_checkpoint,
  write_safetensors,
)
from jaxrobust.interop.layouts import from_torch_layout, layout, to_torch_layout, torch_shape
from jaxrobust.interop.pytorch import (
  INSTALL_TORCH,
  import_torch,
  nchw_to_nhwc,
  nhwc_to_nchw,
  to_torch,
  twin,
)
from jaxrobust.interop.state_dicts import (
  ensemble_state_dict,
  from_torch,
  state_dict_of,
  torch_state_dict,
)

__all__ = [
  "ARCHS",
  "INSTALL_TORCH",
  "ZOO",
  "architecture",
  "architectures",
  "check_export_path",
  "ensemble_state_dict",
  "checkpoint_architecture",
  "files",
  "flax_files",
  "from_torch",
  "from_torch_layout",
  "import_torch",
  "input_hw",
  "layout",
  "layouts",
  "load_checkpoint",
  "model_name",
  "model_settings",
  "nchw_to_nhwc",
  "nhwc_to_nchw",
  "pytorch",
  "read_safetensors",
  "save_checkpoint",
  "state_dict_of",
  "state_dicts",
  "to_torch",
  "to_torch_layout",
  "torch_shape",
  "torch_state_dict",
  "twin",
  "write_safetensors",
]
