"""Checkpoint files: `.pt`/`.pth` (PyTorch's) and `.safetensors` (read and written with numpy).

A `.safetensors` file is an 8-byte little-endian header length n, n bytes
of JSON `{key: {dtype, shape, data_offsets}}` (and an optional
"__metadata__" of strings), then the tensors' bytes, offsets relative to the
end of the header.
"""

import json
import math
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from jaxrobust import checks
from jaxrobust.interop import architectures, pytorch, state_dicts
from jaxrobust.types import Variables

_SAFETENSORS: dict[str, Any] = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "BF16": None,
}
EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")


def load_checkpoint(path: str | PathLike[str]) -> Any:
  """The contents of a checkpoint file.

  Args:
    path: a `.safetensors` file (read with numpy), or a `.pt`/`.pth`/`.bin`
      file (`torch.load(weights_only=True)`, needs PyTorch).

  Returns:
    `{key: array}` (plus "__metadata__" when present) of a `.safetensors`
    file; what was saved in a PyTorch file.

  Raises:
    InputError: a missing file, one that is not a checkpoint, or a truncated one.
  """
  path = Path(path)
  checks.require(path.is_file(), f"checkpoint {str(path)!r} not found")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  torch = pytorch.import_torch()
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Unsupported global" in str(e):  # a pickled class, not only tensors
      raise checks.InputError(
        f"{str(path)!r} holds pickled Python objects (a whole "
        "nn.Module?), which are not read here: save its "
        "model.state_dict() instead"
      ) from None
    raise checks.InputError(
      f"cannot read {str(path)!r} as a PyTorch checkpoint (not one, or truncated): {reason[:200]}"
    ) from None


def _safetensors_header(
  data: bytes, bad: Callable[[str], Exception]
) -> tuple[dict[str, Any], memoryview]:
  """The JSON header of a `.safetensors` file's bytes and the data after it."""
  if len(data) < 8:
    raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
  n = int.from_bytes(data[:8], "little")
  if n > len(data) - 8:
    raise bad(
      f"its header needs {n} bytes, the file has {len(data) - 8} after the length "
      "(truncated, or not safetensors)"
    )
  try:
    header = json.loads(data[8 : 8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise bad("the header is not JSON") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  return header, memoryview(data)[8 + n :]


def _safetensors_tensor(
  key: str, info: Any, buffer: memoryview, bad: Callable[[str], Exception]
) -> np.ndarray:
  """Tensor `key` of a `.safetensors` file from its header entry `info`."""
  try:
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise bad(f"tensor {key!r} has no dtype, shape and data_offsets") from None
  if dtype not in _SAFETENSORS:
    raise bad(f"tensor {key!r} has dtype {dtype!r}, not one of {', '.join(_SAFETENSORS)}")
  size = 2 if dtype == "BF16" else np.dtype(_SAFETENSORS[dtype]).itemsize
  if not 0 <= begin <= end <= len(buffer):
    raise bad(
      f"tensor {key!r} lies at bytes {begin}-{end}, past the data's {len(buffer)} bytes (truncated)"
    )
  if end - begin != size * math.prod(shape):
    raise bad(
      f"tensor {key!r} of shape {shape} and dtype {dtype} needs "
      f"{size * math.prod(shape)} bytes, has {end - begin}"
    )
  raw = buffer[begin:end]
  if dtype == "BF16":  # the high 16 bits of a float32
    a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
  else:
    a = np.frombuffer(raw, np.dtype(_SAFETENSORS[dtype]).newbyteorder("<"))
  return a.reshape(shape).astype(a.dtype.newbyteorder("="))


def read_safetensors(path: str | PathLike[str]) -> dict[str, Any]:
  """The tensors of a `.safetensors` file, read with numpy.

  Args:
    path: the file.

  Returns:
    `{key: numpy array}` (bfloat16 as float32), and "__metadata__" when present.

  Raises:
    InputError: a file that is not safetensors, or a truncated one.
  """
  bad = lambda why: checks.InputError(f"cannot read {str(path)!r} as safetensors: {why}")
  header, buffer = _safetensors_header(Path(path).read_bytes(), bad)
  out: dict[str, Any] = {}
  for key, info in header.items():
    if key == "__metadata__":
      out[key] = info
    else:
      out[key] = _safetensors_tensor(key, info, buffer, bad)
  return out


def write_safetensors(
  path: str | PathLike[str],
  tensors: Mapping[str, Any],
  metadata: Mapping[str, Any] | None = None,
) -> None:
  """Writes tensors as a `.safetensors` file (`read_safetensors`'s format).

  Args:
    path: the file.
    tensors: `{key: array}` of a dtype safetensors has (not bfloat16).
    metadata: strings to store in the header's "__metadata__" (values as `str`).
  """
  codes = {np.dtype(v): k for k, v in _SAFETENSORS.items() if v is not None}
  header: dict[str, Any] = {}
  chunks, offset = [], 0
  for key, a in tensors.items():
    a = np.asarray(a, order="C")  # ascontiguousarray would make a 0-d array 1-d
    checks.require(a.dtype in codes, f"cannot write {key!r} of dtype {a.dtype} as safetensors")
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
    header[key] = {
      "dtype": codes[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
  Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def save_checkpoint(
  path: str | PathLike[str],
  model: nn.Module,
  variables: Variables,
  *,
  input_hw: Sequence[int] | None = None,
) -> None:
  """Writes a jaxrobust model as a PyTorch checkpoint that records its architecture.

  `from_torch` reads either format back (`checkpoint_architecture` gives the arch).

  Args:
    path: a `.pt` or `.pth` file (`torch.save` of {"arch", "settings",
      "state_dict"}, needs PyTorch) or a `.safetensors` file (the state dict,
      with arch and settings in its metadata).
    model: a jaxrobust model without spectral normalisation or noise.
    variables: its variables.
    input_hw: the image size of `small_cnn`/`seed_cnn` (default: the square
      one their weights imply).

  Raises:
    InputError: another suffix, or a model without a PyTorch twin.
  """
  path = check_export_path(path)
  name = architectures.model_name(model)
  settings = architectures.model_settings(model)
  state = state_dicts.torch_state_dict(model, variables, input_hw=input_hw)
  hw = architectures.input_hw(model, variables["params"], input_hw)
  if hw is not None:
    settings["input_hw"] = list(hw)
  if path.suffix == ".safetensors":
    write_safetensors(path, state, {"arch": name, "settings": json.dumps(settings)})
    return
  torch = pytorch.import_torch()
  torch.save(
    {
      "arch": name,
      "settings": settings,
      "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
    },
    path,
  )


def check_export_path(path: str | PathLike[str]) -> Path:
  """The path of a checkpoint `save_checkpoint` can write, checked before the export's work.

  Args:
    path: the file to write.

  Returns:
    `path` as a `Path`.

  Raises:
    InputError: a suffix other than .pt, .pth or .safetensors.
  """
  path = Path(path)
  checks.require(
    path.suffix in EXPORT_SUFFIXES,
    f"--export-torch writes .pt, .pth or .safetensors, not {path.name!r}",
  )
  return path


def checkpoint_architecture(checkpoint: Any) -> tuple[str, dict[str, Any]] | None:
  """The architecture a checkpoint written by `save_checkpoint` records.

  Args:
    checkpoint: what `load_checkpoint` read.

  Returns:
    `(arch, settings)`, or None for a checkpoint that records none.
  """
  if not isinstance(checkpoint, dict):
    return None
  if isinstance(checkpoint.get("arch"), str):
    return checkpoint["arch"], dict(checkpoint.get("settings") or {})
  meta = checkpoint.get("__metadata__")
  if isinstance(meta, dict) and "arch" in meta:
    return meta["arch"], json.loads(meta.get("settings", "{}"))
  return None
