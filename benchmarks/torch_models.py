"""PyTorch twins of jaxrobust's Flax models, with the same weights: the
library's converter, `jaxrobust.interop` (kept here for the benchmarks'
imports). `to_torch(model, variables, input_hw)` returns a `torch.nn.Module`
in evaluation mode that computes the logits of
`model.apply(variables, x, train=False)` on NCHW images in [0, 1]."""

from jaxrobust.interop import nchw_to_nhwc, nhwc_to_nchw, to_torch  # noqa: F401
