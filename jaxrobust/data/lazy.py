"""Images read on demand: numpy-style indexing over a `read(indices)`."""

from typing import Any

import numpy as np


class LazyRows:
  """Rows of an array read only when indexed.

  A subclass defines `__len__`, `read(indices) -> np.ndarray` (the rows at
  those indices, stacked) and `view(start, stop)` (the rows start..stop-1
  as an object of its own kind, nothing read). Then `rows[i]`, `rows[a:b]`
  (a view), `rows[a:b:s]`, `rows[index_array]` and `np.asarray(rows)` (every
  row read) behave as on the array the rows form.
  """

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, indices: np.ndarray) -> np.ndarray:
    """The rows at `indices`, stacked."""
    raise NotImplementedError

  def view(self, start: int, stop: int) -> Any:
    """Rows start..stop-1, read on demand as these are."""
    raise NotImplementedError

  def __getitem__(self, key: Any) -> Any:
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step == 1:
        return self.view(start, max(start, stop))
      return self.read(np.arange(start, stop, step))
    if np.ndim(key) == 0:
      return self.read(np.asarray([key]))[0]
    return self.read(np.asarray(key))

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    images = self.read(np.arange(len(self)))
    return images if dtype is None else images.astype(dtype)
