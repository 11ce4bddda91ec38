"""Image generators shared by the data-free methods, and the sample-grid writer.

:class:`DataFreeGenerator` is CMI's and Fast-DFKD's (zju-vipa/DataFree); below, the DAFL generator.

The DAFL generator (Chen et al., ICCV 2019, arXiv 1904.01186), as a reusable module.

Layer for layer the official code's ``Generator`` (DAFL-train.py), with the channel width as an
argument (``width=128`` is the paper's; the second conv block has ``width // 2`` channels, 64 there):

    z (latent_dim) -> Linear -> width x s/4 x s/4 -> BatchNorm2d(width)
    -> Upsample x2 (nearest) -> Conv3x3 width->width -> BatchNorm2d(width, eps=0.8) -> LeakyReLU(0.2)
    -> Upsample x2 (nearest) -> Conv3x3 width->width/2 -> BatchNorm2d(width/2, eps=0.8) -> LeakyReLU(0.2)
    -> Conv3x3 width/2->C -> Tanh -> BatchNorm2d(C, affine=False)

Pitfall reproduced on purpose: the official ``nn.BatchNorm2d(128, 0.8)`` sets *eps* = 0.8, not the
momentum. The final affine-free BatchNorm maps images into the teacher's normalised input space.

The generator always runs in train mode (batch statistics), as in the official code, which never
calls ``generator.eval()``: :meth:`DAFLGenerator.train` ignores a request for eval mode unless the
module was built with ``always_train=False``.

Its successors use the same layout with small changes, as keyword arguments here (defaults: DAFL's):

- ``bn_eps``: eps of the two inner BatchNorms (DAFL 0.8; DFAD's ``GeneratorA`` and ZSKT's generator use
  torch's default 1e-5: VainF/Data-Free-Adversarial-Distillation network/gan.py, polo5/
  ZeroShotKnowledgeTransfer models/generator.py).
- ``tanh``: the Tanh before the output BatchNorm (DAFL, DFAD: yes; ZSKT: none).
- ``out_affine``: an affine output BatchNorm (ZSKT's ``BatchNorm2d(3, affine=True)``; DAFL/DFAD: affine-free).

:class:`ZSKTGenerator` is the ZSKT variant (Micaelli and Storkey, NeurIPS 2019): no Tanh, affine output
BatchNorm, eps 1e-5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DAFLGenerator(nn.Module):
    """DAFL's image generator: ``forward(z) -> (B, channels, image_size, image_size)``."""

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128,
                 *, always_train: bool = True, bn_eps: float = 0.8, tanh: bool = True, out_affine: bool = False):
        super().__init__()
        if image_size % 4 != 0 or image_size <= 0:
            raise ValueError(f"DAFLGenerator: image_size must be a positive multiple of 4, got {image_size}")
        if width < 2 or width % 2 != 0:
            raise ValueError(f"DAFLGenerator: width must be an even integer >= 2, got {width}")
        for name, value in (("latent_dim", latent_dim), ("channels", channels)):
            if value <= 0:
                raise ValueError(f"DAFLGenerator: {name} must be positive, got {value}")
        if not bn_eps > 0:
            raise ValueError(f"DAFLGenerator: bn_eps must be positive, got {bn_eps}")
        self.latent_dim, self.image_size, self.channels, self.width = latent_dim, image_size, channels, width
        self.always_train, self.tanh = always_train, tanh
        self.init_size = image_size // 4
        self.l1 = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(width, width // 2, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=bn_eps)
        self.conv3 = nn.Conv2d(width // 2, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=out_affine)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def train(self, mode: bool = True) -> "DAFLGenerator":
        # DAFL's generator always normalises with batch statistics; .eval() keeps it in train mode.
        return super().train(True if self.always_train else mode)

    def sample_latent(self, batch_size: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I) of shape (batch_size, latent_dim)."""
        return torch.randn(batch_size, self.latent_dim, device=device, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z.reshape(z.shape[0], -1))
        out = self.bn0(out.view(out.shape[0], self.width, self.init_size, self.init_size))
        out = F.interpolate(out, scale_factor=2, mode="nearest")
        out = self.act(self.bn1(self.conv1(out)))
        out = F.interpolate(out, scale_factor=2, mode="nearest")
        out = self.act(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        return self.bn_out(torch.tanh(out) if self.tanh else out)


class ZSKTGenerator(DAFLGenerator):
    """ZSKT's generator (polo5/ZeroShotKnowledgeTransfer, models/generator.py, the 8x8-start version):

        z -> Linear -> width x s/4 x s/4 -> BatchNorm2d(width) -> Up x2 -> Conv3x3 width->width -> BN -> LReLU(0.2)
        -> Up x2 -> Conv3x3 width->width/2 -> BN -> LReLU(0.2) -> Conv3x3 width/2->C -> BatchNorm2d(C, affine=True)

    No Tanh; BatchNorm eps 1e-5 everywhere; the paper's width is 128 (latent 100). Always in train mode.
    """

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128,
                 *, always_train: bool = True):
        super().__init__(latent_dim, image_size, channels, width, always_train=always_train, bn_eps=1e-5, tanh=False,
                         out_affine=True)


class DataFreeGenerator(nn.Module):
    """The generator of CMI and Fast-DFKD (zju-vipa/DataFree and Fast-Datafree ``models/generator.py``
    ``Generator``, built there with ``nz=256, ngf=64``): pixels in [0, 1] (normalise before the teacher).

        z (latent_dim) -> Linear -> 2w x s/4 x s/4 -> BatchNorm2d(2w) -> Upsample x2 (nearest)
        -> Conv3x3 2w->2w (no bias) -> BatchNorm2d(2w) -> LeakyReLU(0.2) -> Upsample x2
        -> Conv3x3 2w->w (no bias) -> BatchNorm2d(w) -> LeakyReLU(0.2) -> Conv3x3 w->C -> Sigmoid

    Always in train mode (batch statistics), as in the official code, which never calls ``eval()``.
    """

    def __init__(self, latent_dim: int = 256, width: int = 64, image_size: int = 32, channels: int = 3):
        super().__init__()
        if image_size % 4 != 0 or image_size <= 0:
            raise ValueError(f"DataFreeGenerator: image_size must be a positive multiple of 4, got {image_size}")
        for name, value in (("latent_dim", latent_dim), ("width", width), ("channels", channels)):
            if value <= 0:
                raise ValueError(f"DataFreeGenerator: {name} must be positive, got {value}")
        self.latent_dim, self.width, self.image_size, self.channels = latent_dim, width, image_size, channels
        self.init_size = image_size // 4
        self.l1 = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.conv1 = nn.Conv2d(2 * width, 2 * width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 3, stride=1, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def train(self, mode: bool = True) -> "DataFreeGenerator":
        return super().train(True)  # batch statistics always, as the official code

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], 2 * self.width, self.init_size, self.init_size)
        out = F.interpolate(self.bn0(out), scale_factor=2, mode="nearest")
        out = F.interpolate(self.act(self.bn1(self.conv1(out))), scale_factor=2, mode="nearest")
        out = self.act(self.bn2(self.conv2(out)))
        return torch.sigmoid(self.conv3(out))


@torch.no_grad()
def reinitialise(module: nn.Module, *, first_layers_only: bool = False) -> None:
    """DataFree's generator re-initialisation: conv/linear weights ~ N(0, 0.02) with zero bias, BatchNorm
    weights ~ N(1, 0.02) with zero bias (CMI's ``reset_model``, before every synthesised batch).

    ``first_layers_only``: Fast-DFKD's ``reset_l0`` instead: the first Linear (``l1``) and the first
    BatchNorm (``bn0``) weights ~ N(0, 0.02) (the BatchNorm's too: the official code treats both alike),
    biases 0; draws from torch's global RNG."""
    if first_layers_only:
        for layer in (module.l1, module.bn0):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            nn.init.zeros_(layer.bias)
        return
    for m in module.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def save_image_grid(images: torch.Tensor, path, mean, std, *, titles: list[str] | None = None, ncol: int = 8,
                    title: str | None = None) -> None:
    """Save normalised images (B, C, H, W) as a PNG grid, de-normalised with the dataset's ``mean``/``std``.

    ``titles`` (one per image, e.g. the teacher's predicted class) label the tiles. Uses matplotlib's
    object API (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = images.detach().float().cpu()
    channels = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0, 1)
    n = x.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    fig = Figure(figsize=(1.1 * ncol, 1.25 * nrow + (0.3 if title else 0)))
    FigureCanvasAgg(fig)
    for i in range(nrow * ncol):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        img = x[i].permute(1, 2, 0).numpy()
        if channels == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7, pad=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
