"""Spectral normalisation and Lipschitz certificates for Flax Linen networks.

Tools built on one idea: the L2 Lipschitz constant of a linear layer is the
largest singular value (the spectral norm) of the linear map it computes.

* `SpectralNorm` wraps an `nn.Dense`, `nn.Conv` or `nn.ConvTranspose` and
  divides its kernel by an estimate of that norm, kept up to date by power
  iteration during training (Miyato et al. 2018, "Spectral normalization for
  generative adversarial networks"; Farnia, Zhang & Tse 2019, "Generalizable
  adversarial training via spectral normalization").
* `conv_operator_norm` computes the norm of a 2-D convolution as a linear map
  on its actual input shape, strides and padding.
* `jaxrobust.certification.lipschitz` multiplies the norms of a
  feed-forward network's layers into an upper bound on its Lipschitz
  constant, and turns that bound into per-example L2 robustness certificates
  (Tsuzuku, Sato & Sugiyama 2018, "Lipschitz-margin training").

Two norms of a convolution kernel K of shape [kh, kw, c_in, c_out]:

* the *matrix* norm ||K_mat||, the largest singular value of K reshaped to
  K_mat of shape [kh * kw * c_in, c_out] (what Miyato et al.,
  `flax.linen.SpectralNorm` and `torch.nn.utils.spectral_norm` normalise);
* the *operator* norm, max ||conv(x)|| / ||x|| over inputs x of the layer's
  shape (H, W, c_in): the layer's true L2 Lipschitz constant.

Output pixel p is K_mat^T patch_p(x), and with stride 1 every input pixel lies
in at most kh * kw patches, so ||K_mat|| <= operator norm <= sqrt(kh * kw)
||K_mat|| (the left side for inputs at least as large as the kernel): the
matrix norm never overestimates, and can underestimate by up to 3x for a 3x3
kernel. For a dense layer the two coincide.
"""

from jaxrobust.spectral.conv import conv_operator_norm
from jaxrobust.spectral.iteration import lanczos_margin
from jaxrobust.spectral.layer import COLLECTION, KERNEL_LAYERS, MODES, RESCALES, SpectralNorm
