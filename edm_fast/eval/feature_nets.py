"""The feature networks of FID and FD_DINOv2, defined here and loaded from weight files that the
user supplies (nothing is downloaded, no pickled program is ever run).

``InceptionV3Features``: the Inception-v3 of TensorFlow's 2015-12-05 graph that FID is defined
with (Heusel et al. 2017), in the layout of pytorch-fid's port (torchvision's Inception3 module
names with 1008 classes and no auxiliary head, the FID variant's pooling: average pools that
leave the zero padding out of the mean, and a max pool in the last block). ``features`` returns
the 2048-d pool3 activations. Its input step follows NVlabs' detector (the one behind their
reference statistics): images in [0, 255] are resized to 299x299 bilinearly as TensorFlow 1
did (source coordinate = output coordinate x in/out, edges clamped), then mapped by
(x - 128) / 128.

``DinoV2ViT``: the DINOv2 vision transformer (Oquab et al. 2023), ViT-L/14 by default, with the
module names of facebookresearch/dinov2's released backbones (``blocks.<i>`` unchunked, layer
scale ``ls1``/``ls2``, a ``mask_token``), so that ``dinov2_vitl14_pretrain.pth`` loads strictly.
``features`` returns the normalised class token (1024-d) of images in [0, 255] resized to
224x224 bicubically with antialiasing and normalised with ImageNet's mean and std, as
NVlabs/edm2's FD_DINOv2 does.

Accepted weight files (``load_inception`` / ``load_dinov2``): a plain state dict saved by
``torch.save`` (read by edm-fast's restricted unpickler, ``official.read_state_dict``: no code
runs and the cost is bounded by the file, as for snapshots) or a ``.safetensors`` file with the
same keys. Keys and shapes are checked
strictly; ``num_batches_tracked`` counters of batch norms may be absent. NVlabs'
``inception-2015-12-05.pkl`` is refused: it is a pickled TorchScript program, and loading it
runs the code it carries.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadFileError, EdmFastError

__all__ = [
    "DINOV2_WEIGHTS",
    "INCEPTION_WEIGHTS",
    "DinoV2ViT",
    "InceptionV3Features",
    "MissingWeightsError",
    "check_state_dict",
    "load_dinov2",
    "load_inception",
    "load_weight_file",
    "tf1_bilinear_resize",
]

INCEPTION_WEIGHTS = ("pt_inception-2015-12-05-6726825d.pth",
                     ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                      "pt_inception-2015-12-05-6726825d.pth"))
DINOV2_WEIGHTS = ("dinov2_vitl14_pretrain.pth",
                  "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth")


class MissingWeightsError(EdmFastError):
    """A feature network's weight file was not given or does not exist."""


# ----------------------------------------------------------------------------------------------
# Inception-v3 (Szegedy et al. 2016), FID variant


class _ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow's graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TensorFlow's 3x3 average pool: padded zeros do not count in the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35x35 blocks (Mixed_5b..5d)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x))], 1)


class _ReductionB(nn.Module):  # 35x35 -> 17x17 (Mixed_6a)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions (Mixed_6b..6e)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x))], 1)


class _ReductionD(nn.Module):  # 17x17 -> 8x8 (Mixed_7a)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b,
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 blocks with split 1x3/3x1 branches (Mixed_7b, 7c). The FID graph pools the last one
    (Mixed_7c) with a 3x3 max pool where the others average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled)], 1)


def tf1_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to size x size as TensorFlow 1's resize_bilinear without
    half-pixel centres: output pixel i samples the input at i * in / out, edges clamped. Done as
    an affine sampling grid shifted by 1/in - 1/out (in grid_sample's [-1, 1] units), which is
    how NVlabs' Inception detector resizes."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3Features(nn.Module):
    """FID's Inception-v3; ``features(images)`` maps (N, 3, H, W) in [0, 255] to (N, 2048)."""

    feature_dim = 2048
    input_size = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008-way classifier: kept so keys match

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = tf1_bilinear_resize(images.float(), self.input_size)
        return (x - 128) / 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pool3 activations (N, 2048) of an already preprocessed batch."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self(self.preprocess(images))


# ----------------------------------------------------------------------------------------------
# DINOv2 vision transformer (Dosovitskiy et al. 2021; Oquab et al. 2023)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1(attn(norm1 x)), + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2ViT(nn.Module):
    """DINOv2 backbone; the defaults are ViT-L/14 as released (trained at 518 px, so 37x37
    position embeddings, interpolated to the input's patch grid). ``features(images)`` maps
    (N, 3, H, W) in [0, 255] to the (N, embed_dim) normalised class token."""

    def __init__(self, *, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 patch_size: int = 14, train_size: int = 518, mlp_ratio: float = 4.0,
                 input_size: int = 224):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.patch_size, self.input_size, self.feature_dim = patch_size, input_size, embed_dim
        grid = train_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # training only; in the file
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows x cols patch grid: the trained M x M grid resized
        bicubically (no antialiasing) with scale factors (rows + 0.1) / M and (cols + 0.1) / M,
        the DINOv2 backbones' rule (the 0.1 keeps the floor of M * scale at rows, cols)."""
        m = math.isqrt(self.pos_embed.shape[1] - 1)
        if rows == cols == m:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1].float(), self.pos_embed[:, 1:].float()
        grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / m, (cols + 0.1) / m),
                             mode="bicubic", antialias=False)
        if grid.shape[-2:] != (rows, cols):
            raise ValueError(f"position embedding resize gave {tuple(grid.shape[-2:])}, "
                             f"expected {(rows, cols)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls, grid], 1).to(self.pos_embed.dtype)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size),
                          mode="bicubic", antialias=True) / 255
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised class token (N, embed_dim) of an already preprocessed batch."""
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        tokens = tokens + self.position_embedding(rows, cols)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self(self.preprocess(images))


# ----------------------------------------------------------------------------------------------
# Loading weight files


def load_weight_file(path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``official.read_state_dict``).
    Refuses pickled programs such as NVlabs' ``.pkl`` detectors."""
    path = Path(path)
    if path.suffix.lower() == ".pkl":
        raise BadFileError(f"{path}: .pkl detectors (NVlabs' inception-2015-12-05.pkl) are "
                           "pickled TorchScript programs that run code when loaded; give a "
                           "state dict (.pth or .safetensors) instead")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            from ..io.official import read_state_dict  # bounded cost, no code (docs/OFFICIAL.md)

            if _is_torchscript(path):
                raise BadFileError(f"{path} is not a plain state dict readable without running "
                                   "code (a TorchScript program, which runs code when loaded)")
            try:
                state = read_state_dict(path)
            except BadFileError as exc:
                why = str(exc).removeprefix(f"{path}").lstrip(": ")
                raise BadFileError(f"{path} is not a plain state dict readable without running "
                                   f"code ({why[:200]})") from None
    except (OSError, BadFileError):
        raise
    except Exception as exc:  # safetensors' own error types for refused files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "TorchScript" in first:
            first = "a TorchScript program, which runs code when loaded"
        raise BadFileError(f"{path} is not a plain state dict readable without running code "
                           f"({first[:200]})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BadFileError(f"{path} does not hold a flat state dict (names -> tensors)")
    return state


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding compiled code (``code/``) or ``constants.pkl``."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl"))
                   for n in archive.namelist())


def check_state_dict(model: nn.Module, state: dict, path, what: str) -> None:
    """Every parameter and buffer of ``model`` present in ``state`` with its shape, and nothing
    else (batch-norm ``num_batches_tracked`` counters may be missing); one-line error."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in expected
                   if k in state and tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise BadFileError(f"{path} is not a {what} state dict ({'; '.join(problems)})")


def _load(build, path, what: str, option: str, weights: tuple[str, str], device) -> nn.Module:
    """``build()`` made on the meta device (no random initialisation of 300M parameters),
    checked against the file, then given storage on ``device`` and the file's tensors."""
    name, url = weights
    if path is None:
        raise MissingWeightsError(f"{what} needs its weights: download {name} from {url} and "
                                  f"pass {option} PATH")
    if not Path(path).is_file():
        raise MissingWeightsError(f"{option} {path}: no such file; download {name} from {url}")
    state = load_weight_file(path)
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state, path, what)
    model = model.to_empty(device=device)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)  # a counter used in training only
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def load_inception(path, device="cpu") -> InceptionV3Features:
    """FID's Inception-v3 from pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (or the same
    keys in a .safetensors file)."""
    return _load(InceptionV3Features, path, "FID's Inception-v3", "--inception-weights",
                 INCEPTION_WEIGHTS, device)


def load_dinov2(path, device="cpu", **vit_kwargs) -> DinoV2ViT:
    """DINOv2 ViT-L/14 from ``dinov2_vitl14_pretrain.pth`` (or the same keys in a .safetensors
    file); ``vit_kwargs`` change the architecture (tests use a small one)."""
    return _load(lambda: DinoV2ViT(**vit_kwargs), path, "DINOv2 ViT-L/14", "--dinov2-weights",
                 DINOV2_WEIGHTS, device)
