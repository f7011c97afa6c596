"""Sample quality: FID, KID and precision/recall of a run's samples against its data set.

    features   torch-fidelity's FID Inception (`inception-v3-compat`, the TF-FID / pytorch-fid
               weights, 2048-d pool features; it resizes to 299 px itself, TF1-style bilinear), from
               a local file, never downloaded; or any FeatureNet (a test's digit classifier)
    samples    drawn in blocks of `batch_size`, block k from a generator seeded by (seed, k) and
               computed by rank k mod world: 1 and N ranks draw and score the same samples
    reference  the features of every image of a .beton split exactly once across ranks, cached
               beside the .beton (<beton>.fid-<split>-<net>.npz) keyed by its size, modification
               time and the feature network; a changed file is scored again
    metrics    FID (Frechet distance of the two Gaussians, float64), KID (unbiased MMD^2 with the
               cubic kernel over random subsets, mean and s.d., as torch-fidelity draws them),
               precision and recall (Kynkaanniemi et al. 2019, k-NN balls, k = 3)

Images reach the feature network as uint8, as a saved PNG holds them; grey images are repeated to
RGB, as torch-fidelity's PIL .convert("RGB") does.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..errors import UserError
from ..images import to_uint8
from .checkpoints import seeded_generator

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
METRICS = ("fid", "kid", "pr")
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
PR_NEIGHBOURHOOD = 3


# -- the feature network -------------------------------------------------------------------------

def default_inception_path() -> Path:
    """Where torch-fidelity puts the file it downloads: the torch hub cache's checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_setting(value: str) -> str:
    """eval.inception_weights: '' -> the torch hub cache file; 'random' (seeded random weights, for
    tests: the figures are then not FID); else a path. A missing file is one line naming it."""
    if value == "random":
        return value
    path = Path(value).expanduser() if value else default_inception_path()
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} (torch-fidelity downloads {INCEPTION_FILE} there from "
                        f"{INCEPTION_URL}; copy the file there or set eval.inception_weights=PATH)")
    return str(path)


def import_torch_fidelity():
    """torch_fidelity, imported. Beside a CPU build of torch, PyPI's torchvision wheel cannot load its
    C++ ops and then fails on import registering fake kernels for two of them (nms, qnms):
    declaring their schemas first lets the pure-Python parts that torch-fidelity uses import."""
    try:
        import torch_fidelity
        return torch_fidelity
    except ImportError as e:
        raise UserError(f"torch-fidelity is not installed ({e}): pip install torch-fidelity==0.4.0 (make setup "
                        f"installs it)") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in list(sys.modules):
        if name.split(".")[0] in ("torchvision", "torch_fidelity"):
            del sys.modules[name]
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already declared
            pass
    import torch_fidelity
    return torch_fidelity


class FeatureNet:
    """uint8 images (B, 3, H, W) -> (B, dims) float32 features. `name` keys the reference cache:
    it must change whenever the features would."""

    name: str = ""
    dims: int = 0
    label: str = ""  # what the figures are, e.g. "FID (Inception)" or "random Inception weights: not FID"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _inception_class():
    return import_torch_fidelity().FeatureExtractorInceptionV3


def random_inception_state(seed: int = 0) -> dict:
    """Random weights for torch-fidelity's Inception that keep activations of order 1 through its
    depth (He-normal convolutions, identity batch norm): stand-in weights for tests, named as such."""
    base = _inception_class()

    class _Unloaded(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pt"
        torch.save({}, empty)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=0.01)
                    torch.nn.init.zeros_(m.bias)
    return {k: v.clone() for k, v in net.state_dict().items()}


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    path = Path(path)
    torch.save(random_inception_state(seed), path)
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


class InceptionFeatures(FeatureNet):
    """torch-fidelity's FeatureExtractorInceptionV3 ('2048' features), on `device`."""

    dims = 2048

    def __init__(self, weights: str = "", device="cpu"):
        setting = inception_setting(weights)
        cls = _inception_class()
        if setting == "random":
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                f = write_random_inception_weights(Path(d) / "random.pth")
                self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(f))
            self.name = "inception-v3-compat:random-seed0"
            self.label = "random Inception weights: NOT FID (a test stand-in)"
        else:
            try:
                self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=setting)
            except Exception as e:  # torch.load and load_state_dict raise many types for a foreign file
                raise UserError(f"{setting}: not torch-fidelity's Inception weights ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None
            self.name = f"inception-v3-compat:{_file_digest(Path(setting))}"
            self.label = "FID (torch-fidelity Inception)"
        self.weights = setting
        self.device = torch.device(device)
        # channels-last weights on the CPU: oneDNN's convolutions, 1.35x the images/s here (features
        # within 2e-6 of the contiguous layout's); CUDA keeps torch-fidelity's layout
        layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.net.to(self.device, memory_format=layout)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (f,) = self.net(x.to(self.device))
        return f.float().cpu()


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 or floats in [0, 1] -> uint8 RGB (grey repeated)."""
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"images of {x.shape[1]} channels; expected 1 or 3")
    return x


# -- statistics and metrics ----------------------------------------------------------------------

@dataclass
class Stats:
    """The feature Gaussian of a set (float64) and, for KID and precision/recall, its features."""

    n: int
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None


def stats_of(features: np.ndarray) -> Stats:
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(f)}")
    return Stats(len(f), f.mean(0), np.cov(f, rowvar=False), np.asarray(features, np.float32))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. tr (S1 S2)^(1/2) is the sum of the
    singular values of S1^(1/2) S2^(1/2) (the square roots of the eigenvalues of S1 S2): real and
    free of the square roots of rounding noise that the eigenvalues of the product S1 S2 give where
    a covariance is singular (fewer images than feature dimensions)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} / {mu2.shape}")
    tr_covmean = float(np.linalg.svd(_sqrt_psd(s1) @ _sqrt_psd(s2), compute_uv=False).sum())
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _mmd2_unbiased(kxx, kxy, kyy) -> float:
    m = kxx.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(fake: np.ndarray, real: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float, int]:
    """(mean, s.d., subset size) of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over `subsets`
    pairs of random subsets, drawn as torch-fidelity does (one RandomState: the fake subset, then
    the real one). A subset size above the smaller set is lowered to it (torch-fidelity refuses)."""
    fake, real = np.asarray(fake), np.asarray(real)
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise UserError(f"KID needs at least 2 images on each side, got {len(fake)} and {len(real)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        f = fake[rng.choice(len(fake), m, replace=False)]
        r = real[rng.choice(len(real), m, replace=False)]
        mmds[i] = _mmd2_unbiased(_poly_kernel(f, f), _poly_kernel(f, r), _poly_kernel(r, r))
    return float(mmds.mean()), float(mmds.std()), m


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row (the row itself is the 0th)."""
    return torch.cat([torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)])


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(part, centres) <= radii).any(dim=1) for part in points.split(chunk)])


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     chunk: int = 10000) -> tuple[float, float]:
    """Precision: the share of samples inside the k-NN ball of some real image; recall: the share of
    real images inside the k-NN ball of some sample (Kynkaanniemi et al. 2019). Distances in chunks
    of rows, so memory stays at chunk x n."""
    f, r = torch.as_tensor(np.asarray(fake, np.float32)), torch.as_tensor(np.asarray(real, np.float32))
    if min(len(f), len(r)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images on each side, got {len(f)} and "
                        f"{len(r)}")
    precision = _inside_any(f, r, _kth_radius(r, k, chunk), chunk).float().mean().item()
    recall = _inside_any(r, f, _kth_radius(f, k, chunk), chunk).float().mean().item()
    return precision, recall


def check_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"--metrics: {bad[0] if bad else text!r} is not one of {', '.join(METRICS)}")
    return names


def score(fake: np.ndarray, ref: Stats, metrics=METRICS, kid_subset_size: int = KID_SUBSET_SIZE) -> dict:
    """The chosen metrics of sample features `fake` against the reference statistics."""
    out = {}
    if "fid" in metrics:
        s = stats_of(fake)
        out["fid"] = frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        out["kid"], out["kid_std"], out["kid_subset_size"] = kernel_inception_distance(fake, ref.features,
                                                                                       subset_size=kid_subset_size)
        out["kid_subsets"] = KID_SUBSETS
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(fake, ref.features)
        out["pr_k"] = PR_NEIGHBOURHOOD
    return out


# -- features over ranks ------------------------------------------------------------------------

def _bar(total: int, desc: str, progress: bool, env):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0,
                disable=not (progress and env.is_main), file=sys.stderr)


def _gather_rows(mine: torch.Tensor, rows: np.ndarray, per_rank: int, total: int, world: int) -> torch.Tensor:
    """Every rank's feature rows (global row numbers `rows`, padded to per_rank) to every rank, in
    global order."""
    if world == 1:
        out = torch.empty(total, mine.shape[1], dtype=mine.dtype)
        out[torch.from_numpy(rows)] = mine
        return out
    dims = mine.shape[1]
    pad = torch.zeros(per_rank, dims + 1, dtype=torch.float64)
    pad[:len(mine), :dims] = mine.double()
    pad[:, dims] = -1
    pad[:len(mine), dims] = torch.from_numpy(rows).double()
    every = dist.all_gather_cat(pad)
    keep = every[:, dims] >= 0
    out = torch.empty(total, dims, dtype=mine.dtype)
    out[every[keep, dims].long()] = every[keep, :dims].to(mine.dtype)
    return out


def block_rows(n: int, batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """The global sample numbers of each block rank `rank` draws: block k = samples k B .. k B + B - 1
    (fewer in the last), on rank k mod world."""
    blocks = math.ceil(n / batch_size)
    return [np.arange(k * batch_size, min(n, (k + 1) * batch_size)) for k in range(rank, blocks, world)]


def local_sample_features(n: int, draw, net: FeatureNet, batch_size: int, world: int, rank: int, seed: int = 0,
                          bar=None) -> tuple[torch.Tensor, np.ndarray, dict]:
    """This rank's share of sample_features: (its features, their global sample numbers, seconds)."""
    feats, t_sample, t_feat = [], 0.0, 0.0
    mine = block_rows(n, batch_size, world, rank)
    for rows in mine:
        k = int(rows[0]) // batch_size
        t0 = time.perf_counter()
        images = draw(len(rows), seeded_generator(seed, 29, k))
        x = as_rgb_uint8(images.cpu() if images.dtype == torch.uint8 else images.float().cpu())
        t1 = time.perf_counter()
        feats.append(net(x))
        t_sample += t1 - t0
        t_feat += time.perf_counter() - t1
        if bar is not None:
            bar.update(min(len(rows) * world, n - bar.n))
    rows = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    local = torch.cat(feats) if feats else torch.zeros(0, net.dims)
    return local, rows, {"sampling_s": t_sample, "features_s": t_feat}


def sample_features(n: int, draw, net: FeatureNet, env, batch_size: int, seed: int = 0,
                    progress: bool = True, desc: str = "samples -> features",
                    lockstep: bool = False) -> tuple[np.ndarray, dict]:
    """Features of n samples: block k (batch_size samples, fewer in the last) is drawn by
    draw(b, generator) -> images in [0, 1] (or uint8) with a CPU generator seeded by (seed, k), on
    rank k mod world. lockstep: every rank draws as many blocks (a rank short of one first draws a
    block it throws away), for models whose forward needs every rank (ZeRO-3 engines). -> ((n, dims)
    float32 in sample order on every rank, seconds spent sampling and extracting on this rank)."""
    if n < 2:
        raise UserError(f"--n must be at least 2, got {n}")
    world, rank = env.world_size, env.rank
    blocks = math.ceil(n / batch_size)
    per_rank = math.ceil(blocks / world)
    if lockstep:
        with torch.random.fork_rng(devices=[]):
            for _ in range(per_rank - len(block_rows(n, batch_size, world, rank))):
                draw(1, seeded_generator(seed, 29, blocks))
    bar = _bar(n, desc, progress, env)
    local, rows, times = local_sample_features(n, draw, net, batch_size, world, rank, seed, bar)
    bar.close()
    return _gather_rows(local, rows, per_rank * batch_size, n, world).numpy(), times


def split_ids(info, split: str) -> np.ndarray:
    if split == "all":
        return np.arange(info.num_images, dtype=np.int64)
    if split not in ("train", "val"):
        raise UserError(f"--split is {split!r}; expected train, val or all")
    ids = info.ids(split)
    if len(ids) < 2:
        raise UserError(f"{info.path}: {len(ids)} {split} images; FID needs at least 2")
    return ids


def image_features(info, ids: np.ndarray, net: FeatureNet, env, channels: int, batch_size: int, workers: int = 2,
                   transform=None, progress: bool = True, desc: str = "reference features") -> np.ndarray:
    """Features of the images `ids` of a .beton (each once across ranks; EvalShard gives rank r the
    ids r, r + world, ...), in the order of `ids`, on every rank. `transform` maps a uint8 batch to
    images (rFID's reconstructions)."""
    from ..data.loader import EvalLoader
    from ..data.order import EvalShard

    world = env.world_size
    shard = EvalShard(ids, batch_size, world, env.rank)
    loader = EvalLoader(info, shard, channels, workers, ("image",))
    feats = []
    bar = _bar(len(ids), desc, progress, env)
    for batch, n in loader:
        if n:
            x = batch["image"][:n]
            feats.append(net(as_rgb_uint8(transform(x) if transform is not None else x)))
        bar.update(min(len(ids) - bar.n, max(n, 0) * world))
    bar.close()
    local = torch.cat(feats) if feats else torch.zeros(0, net.dims)
    rows = np.arange(env.rank, len(ids), world)[:len(local)]  # EvalShard: rank r has ids[r::world]
    return _gather_rows(local, rows, shard.num_batches * batch_size, len(ids), world).numpy()


# -- reference statistics, cached ---------------------------------------------------------------------

def cache_path(beton: Path, split: str, net: FeatureNet) -> Path:
    tag = hashlib.sha256(net.name.encode()).hexdigest()[:10]
    return beton.with_name(f"{beton.name}.fid-{split}-{tag}.npz")


def _key(beton: Path, split: str, net: FeatureNet, channels: int) -> dict:
    st = beton.stat()
    return {"beton_size": st.st_size, "beton_mtime_ns": st.st_mtime_ns, "split": split, "net": net.name,
            "channels": channels}


def _read_cache(path: Path, key: dict) -> Stats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            return Stats(int(z["n"]), z["mu"], z["sigma"], z["features"])
    except (OSError, ValueError, KeyError):
        return None


def reference_stats(info, split: str, net: FeatureNet, env, channels: int, batch_size: int, workers: int = 2,
                    progress: bool = True) -> tuple[Stats, dict]:
    """The statistics of a .beton split, from the cache beside it when its key matches; else computed
    (every image once across ranks) and written there by rank 0. -> (stats, {'cache', 'cached'})."""
    beton = Path(info.path)
    path = cache_path(beton, split, net)
    key = _key(beton, split, net, channels)
    cached = _read_cache(path, key) if path.is_file() else None
    hit = dist.all_reduce_sum(torch.tensor([0.0 if cached is None else 1.0]))
    if float(hit[0]) == env.world_size:
        return cached, {"cache": str(path), "cached": True}
    ids = split_ids(info, split)
    f = image_features(info, ids, net, env, channels, batch_size, workers, progress=progress,
                       desc=f"reference features ({split})")
    stats = stats_of(f)
    note = {"cache": str(path), "cached": False}
    if env.is_main:
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            np.savez(tmp, key=json.dumps(key), n=stats.n, mu=stats.mu, sigma=stats.sigma, features=stats.features)
            os.replace(tmp, path)
        except OSError as e:
            note["cache_error"] = f"{type(e).__name__}: {e}"
            print(f"note: could not cache the reference statistics at {path} ({e}); they are computed again next "
                  f"time", file=sys.stderr, flush=True)
    dist.barrier()
    return stats, note


# -- a run's samples against its data -----------------------------------------------------------------

def _default_path_of(loaded, split: str, n: int, temperature: float, recon: bool) -> Path:
    what = f"rfid-{split}" if recon else f"fid-{split}-n{n}-t{temperature:g}"
    return loaded.path.with_name(f"{loaded.path.name}.{what}.json")


@torch.no_grad()
def evaluate_samples(loaded, net: FeatureNet, n: int = 50000, split: str = "train", temperature: float = 1.0,
                     batch_size: int = 64, metrics=METRICS, recon: bool = False, seed: int = 0, data_path: str = "",
                     progress: bool = True) -> dict:
    """FID / KID / precision-recall of n samples of a loaded run (recon: the reconstructions of every
    image of the split, rFID) against the real images of the split. The same figures on any world
    size; computed on rank 0 and handed to every rank."""
    from ..data import to_model_input
    from ..data.loader import BetonInfo
    from ..task import CodePrior, Codes, Samples, has, require

    env, task = loaded.env, loaded.task
    # a prior's own data is the code .beton: its samples are scored against the first stage's images
    d = task.first.recipe.data if has(task, CodePrior) and task.first is not None else loaded.recipe.data
    metrics = tuple(metrics)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not recon and n < 2:
        raise UserError(f"--n must be at least 2, got {n}")
    if recon and not has(task, Codes):
        raise UserError(f"{loaded.path}: --recon scores a stage-1 model's reconstructions; family "
                        f"{loaded.family!r} has no codes")
    if not recon and not has(task, Samples) and has(task, Codes):
        raise UserError(f"{loaded.path}: family {loaded.family!r} cannot draw samples (--recon scores its "
                        f"reconstructions: rFID)")
    if not recon:
        require(task, Samples, f"{loaded.path}: eval_fid.py")
    if float(temperature) <= 0:
        raise UserError(f"--temperature must be > 0, got {temperature:g}")
    info = BetonInfo(data_path or d.path)
    info.check_channels(d.channels)
    ids = split_ids(info, split)
    t0 = time.perf_counter()
    timing = {}
    if recon:
        module = loaded.module

        def reconstruct(x):
            y = to_model_input(x, d.num_bits, loaded.device)
            return ((task.decode_indices(module, task.encode_indices(module, y)).float() + 1) / 2).cpu()

        t1 = time.perf_counter()
        fake = image_features(info, ids, net, env, d.channels, batch_size, d.workers, reconstruct, progress,
                              desc=f"reconstructions ({split}) -> features")
        timing["reconstruct_and_features_s"] = time.perf_counter() - t1
        n = len(ids)
    else:
        fake, timing = sample_features(n, lambda b, g: task.sample(b, float(temperature), g, loaded.ctx(b)), net,
                                       env, batch_size, seed, progress)
    t_ref = time.perf_counter()
    ref, note = reference_stats(info, split, net, env, d.channels, batch_size, d.workers, progress)
    timing["reference_s"] = time.perf_counter() - t_ref
    t_score = time.perf_counter()
    figures = score(fake, ref, metrics) if env.is_main else None
    figures = dist.broadcast_object(figures)
    timing["metrics_s"] = time.perf_counter() - t_score
    bn = loaded.info.get("bn")
    return {"checkpoint": str(loaded.path), "family": loaded.family, "data": str(info.path), "split": split,
            "n": n, "reference_images": ref.n, "recon": recon, "temperature": None if recon else float(temperature),
            "seed": seed, "batch_size": batch_size, "world_size": env.world_size,
            "weights": loaded.info.get("weights"), "bn_recalibrated": bn is not None, "bn": bn,
            "feature_network": net.name, "features": net.label, "metrics": list(metrics), **figures,
            "reference_cache": note, "seconds": round(time.perf_counter() - t0, 2),
            "timing": {k: round(v, 3) for k, v in timing.items()}}


def format_report(r: dict) -> str:
    what = (f"reconstructions of the {r['n']} {r['split']} images" if r["recon"] else
            f"{r['n']} samples at t={r['temperature']:g}")
    head = (f"{what} vs {r['reference_images']} real {r['split']} images of {r['data']} | features {r['features']} | "
            f"world {r['world_size']} | batch {r['batch_size']} | seed {r['seed']} | weights {r['weights']} | BN "
            f"{'recalibrated' if r['bn_recalibrated'] else 'training statistics'} | reference "
            f"{'cached' if r['reference_cache']['cached'] else 'computed'} | {r['seconds']:.1f} s")
    rows = []
    stand_in = "   (random Inception weights: not FID)" if "NOT FID" in r["features"] else ""
    if "fid" in r:
        rows.append(f"{'rFID' if r['recon'] else 'FID'}        {r['fid']:.4f}{stand_in}")
    if "kid" in r:
        rows.append(f"KID        {r['kid']:.6f} +- {r['kid_std']:.6f} ({r['kid_subsets']} subsets of "
                    f"{r['kid_subset_size']})")
    if "precision" in r:
        rows.append(f"precision  {r['precision']:.4f}\nrecall     {r['recall']:.4f} (k={r['pr_k']})")
    out = head + "\n" + "\n".join(rows)
    if r["n"] < 50000:
        out += (f"\nnote: FID at n={r['n']} is biased upwards against the papers' n=50,000: compare figures at the "
                f"same n")
    return out
