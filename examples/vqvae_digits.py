"""The four models of the VAE / VQ-VAE lecture notes, trained side by side on scikit-learn's digits.

    python examples/vqvae_digits.py --out runs/digits            # writes runs/digits/samples.png
    python examples/vqvae_digits.py --compare                    # also vector-quantize-pytorch's VectorQuantize

1. Shallow VQ autoencoder: k-means on raw pixels (``fastvq.kmeans``). Encode = nearest centroid,
   decode = that centroid. Generate: a uniformly chosen centroid plus N(0, I) noise.
2. Shallow VQ-VAE: a Gaussian mixture with identity covariance and uniform prior P(z) = 1/K,
   fitted by EM. k-means is its hard-assignment limit. Encode = argmax responsibility, which with
   identity covariance and a uniform prior is exactly the nearest mean (``fastvq.nearest_code``).
3. Continuous beta-VAE: reparameterisation trick, loss = -log N(x; mu(z), I) + beta * KL(Q(z|x) || N(0, I)).
4. Deep VQ-VAE: the encoder output h in R^{l x d} is split into l vectors, each quantized by
   ``fastvq.FastVectorQuantizer`` (EMA codebook), concatenated and decoded.
   Loss = reconstruction MSE + beta * commitment. Generate: z_j uniform in {1..K} per position, decode.

The data are the 1797 8x8 digit images (pixel values 0..16), split once into train and test with a
fixed seed. Every model works in these raw pixel units, so "identity covariance" means a standard
deviation of one grey level out of 16 and every reported MSE is per pixel, in grey levels squared.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import fastvq

PIXEL_MAX = 16.0  # digits pixels are integers 0..16
SPLIT_SEED = 0  # the train/test split never changes with --seed


@dataclass
class Config:
    seed: int = 0
    test_fraction: float = 0.2
    backend: str = "auto"  # fastvq backend for every fastvq call
    shallow_codes: int = 64  # K of models 1 and 2
    kmeans_iters: int = 25
    em_iters: int = 25
    hidden: int = 256  # MLP width of models 3 and 4
    latent_dim: int = 8  # beta-VAE z
    beta: float = 1.0  # beta-VAE KL weight
    positions: int = 8  # l: vectors per image in the deep VQ-VAE
    code_dim: int = 4  # d
    codebook_size: int = 64  # K of the deep VQ-VAE
    commitment_weight: float = 0.25  # beta of the VQ-VAE loss
    decay: float = 0.95
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    num_show: int = 6  # images per strip in samples.png
    threads: int = 1  # torch threads; the networks are so small that more threads mostly add sync cost
    progress: bool = True


@dataclass
class Result:
    name: str
    test_mse: float
    seconds: float
    reconstructions: Tensor  # (num_show, 64)
    samples: Tensor  # (num_show, 64)
    perplexity: float | None = None  # VQ models only
    utilization: float | None = None
    note: str = ""


def load_split(cfg: Config) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels = load_digits().data.astype("float32")  # (1797, 64), bundled with scikit-learn
    train, test = train_test_split(pixels, test_size=cfg.test_fraction, random_state=SPLIT_SEED)
    return torch.from_numpy(train), torch.from_numpy(test)


def code_usage(indices: Tensor, num_codes: int) -> tuple[float, float]:
    """Perplexity exp(H(p)) of the code frequencies p, and the fraction of codes used at least once."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts[counts > 0] / counts.sum()
    return math.exp(float(-(p * p.log()).sum())), float((counts > 0).double().mean())


def mse(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).mean())


def progress(cfg: Config, iterable, desc: str):
    return tqdm(iterable, desc=desc, leave=False, disable=not cfg.progress)


def uniform_codes(cfg: Config, num_codes: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randint(num_codes, shape, generator=torch.Generator().manual_seed(cfg.seed + 1))


def unit_noise(cfg: Config, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + 2))


# ---- 1. shallow VQ autoencoder: k-means -------------------------------------------------------
def shallow_vq_autoencoder(cfg: Config, train: Tensor, test: Tensor) -> Result:
    start = time.perf_counter()
    num_codes = cfg.shallow_codes
    centroids, _ = fastvq.kmeans(train, num_codes, iters=cfg.kmeans_iters, seed=cfg.seed, backend=cfg.backend)
    indices, _ = fastvq.nearest_code(test, centroids, backend=cfg.backend)  # encode
    reconstructions = centroids[indices]  # decode
    picks = uniform_codes(cfg, num_codes, (cfg.num_show,))
    samples = centroids[picks] + unit_noise(cfg, (cfg.num_show, test.shape[1]))  # x ~ N(mu_z, I)
    seconds = time.perf_counter() - start
    perplexity, utilization = code_usage(indices, num_codes)
    return Result("1 shallow VQ-AE (k-means)", mse(reconstructions, test), seconds,
                  reconstructions[: cfg.num_show], samples, perplexity, utilization)


# ---- 2. shallow VQ-VAE: Gaussian mixture, identity covariance, uniform prior, EM ---------------
def fit_gaussian_mixture(cfg: Config, train: Tensor) -> tuple[Tensor, float, float]:
    """EM for p(x) = (1/K) sum_k N(x; mu_k, I). Returns (means, mean log-likelihood, mean max responsibility).

    The E-step needs every responsibility r_ik, i.e. the full N x K matrix. fastvq's kernels never
    build that matrix (they keep only the argmin), so it is plain PyTorch here, which is fine for
    N x K = 1437 x 64; the M-step is then a responsibility-weighted sum (R^T X), not the per-code
    sums of ``fastvq.ema_stats``, which serve the hard-assignment limit. fastvq supplies that limit:
    k-means (nearest_code + ema_stats) for the initial means, and nearest_code for encoding.
    """
    num_codes, dim = cfg.shallow_codes, train.shape[1]
    means, _ = fastvq.kmeans(train, num_codes, iters=cfg.kmeans_iters, seed=cfg.seed, backend=cfg.backend)
    train64 = train.double()
    means = means.double()
    log_constant = -0.5 * dim * math.log(2 * math.pi) - math.log(num_codes)
    for _ in progress(cfg, range(cfg.em_iters), "EM (Gaussian mixture)"):
        log_joint = -0.5 * torch.cdist(train64, means).square()  # log N(x_i; mu_k, I) + const
        log_evidence = torch.logsumexp(log_joint, dim=1, keepdim=True)
        responsibilities = (log_joint - log_evidence).exp()  # E-step
        mass = responsibilities.sum(0)  # M-step: mu_k = sum_i r_ik x_i / sum_i r_ik
        updated = responsibilities.T @ train64 / mass.clamp_min(1e-12)[:, None]
        means = torch.where(mass[:, None] > 1e-12, updated, means)  # an empty component keeps its mean
    log_joint = -0.5 * torch.cdist(train64, means).square()
    log_likelihood = float((torch.logsumexp(log_joint, dim=1) + log_constant).mean())
    hardness = float(torch.softmax(log_joint, dim=1).max(1).values.mean())
    return means.float(), log_likelihood, hardness


def shallow_vq_vae(cfg: Config, train: Tensor, test: Tensor) -> Result:
    start = time.perf_counter()
    means, log_likelihood, hardness = fit_gaussian_mixture(cfg, train)
    # Q(z|x) = argmax_k r_k(x) = argmin_k ||x - mu_k||^2 with identity covariance and uniform prior.
    indices, _ = fastvq.nearest_code(test, means, backend=cfg.backend)
    reconstructions = means[indices]
    picks = uniform_codes(cfg, cfg.shallow_codes, (cfg.num_show,))  # z ~ U{1..K}
    samples = means[picks] + unit_noise(cfg, (cfg.num_show, test.shape[1]))  # x ~ N(mu_z, I)
    seconds = time.perf_counter() - start
    perplexity, utilization = code_usage(indices, cfg.shallow_codes)
    note = (f"GMM: mean train log p(x) = {log_likelihood:.1f} nats; mean max responsibility {hardness:.4f} "
            "(1 = hard assignments, i.e. k-means)")
    return Result("2 shallow VQ-VAE (GMM, EM)", mse(reconstructions, test), seconds,
                  reconstructions[: cfg.num_show], samples, perplexity, utilization, note)


# ---- networks ---------------------------------------------------------------------------------
def mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, width_out))


class BetaVAE(nn.Module):
    def __init__(self, cfg: Config, pixels: int):
        super().__init__()
        self.encoder = mlp(pixels, cfg.hidden, 2 * cfg.latent_dim)
        self.decoder = mlp(cfg.latent_dim, cfg.hidden, pixels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.encoder(x / PIXEL_MAX).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z) * PIXEL_MAX  # the mean of P(x|z) = N(mu_x, I)

    def loss(self, x: Tensor, beta: float) -> Tensor:
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)  # reparameterisation trick
        reconstruction = 0.5 * ((self.decode(z) - x) ** 2).sum(1)  # -log N(x; mu_x, I) + const
        kl = 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).sum(1)  # KL(Q(z|x) || N(0, I))
        return (reconstruction + beta * kl).mean()


class DeepVQVAE(nn.Module):
    """x -> h in R^{l x d} -> l quantized vectors -> concatenated -> decoded."""

    def __init__(self, cfg: Config, pixels: int, make_quantizer):
        super().__init__()
        self.positions, self.code_dim = cfg.positions, cfg.code_dim
        self.encoder = mlp(pixels, cfg.hidden, cfg.positions * cfg.code_dim)
        self.decoder = mlp(cfg.positions * cfg.code_dim, cfg.hidden, pixels)
        self.quantizer = make_quantizer()  # built last, so both quantizers see the same network weights

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x / PIXEL_MAX).view(-1, self.positions, self.code_dim)  # l vectors of size d

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(codes.reshape(codes.shape[0], -1)) * PIXEL_MAX

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, commitment = self.quantizer(self.encode(x))
        return self.decode(quantized), indices, commitment.sum()


@torch.no_grad()
def init_codebook_from_data(cfg: Config, model: DeepVQVAE, train: Tensor) -> None:
    """Start the codebook at K encoder outputs of training images, and reset its EMA state to match."""
    vectors = model.encode(train).reshape(-1, cfg.code_dim)
    pick = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.codebook_size]
    codebook = vectors[pick].clone()
    quantizer = model.quantizer
    if isinstance(quantizer, fastvq.FastVectorQuantizer):
        quantizer.set_codebook(codebook)
    else:  # vector-quantize-pytorch: the same state, (1, K, d) with one codebook
        quantizer._codebook.embed.copy_(codebook[None])
        quantizer._codebook.embed_avg.copy_(codebook[None])
        quantizer._codebook.cluster_size.fill_(1.0)


def train_network(cfg: Config, model: nn.Module, train: Tensor, step_loss, desc: str) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = progress(cfg, range(cfg.epochs), desc)
    for _ in bar:
        for batch in torch.randperm(train.shape[0], generator=order).split(cfg.batch_size):
            loss = step_loss(train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if cfg.progress:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()


# ---- 3. continuous beta-VAE -------------------------------------------------------------------
def beta_vae(cfg: Config, train: Tensor, test: Tensor) -> Result:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = BetaVAE(cfg, train.shape[1])
    train_network(cfg, model, train, lambda x: model.loss(x, cfg.beta), f"beta-VAE (beta={cfg.beta:g})")
    with torch.no_grad():
        reconstructions = model.decode(model.encode(test)[0])  # decode the posterior mean
        samples = model.decode(unit_noise(cfg, (cfg.num_show, cfg.latent_dim)))  # z ~ N(0, I)
    seconds = time.perf_counter() - start
    return Result("3 beta-VAE", mse(reconstructions, test), seconds, reconstructions[: cfg.num_show], samples)


# ---- 4. deep VQ-VAE ---------------------------------------------------------------------------
def fastvq_quantizer(cfg: Config) -> nn.Module:
    # The VQ-VAE paper's EMA quantizer: straight-through gradient (vqp's default is the rotation trick).
    return fastvq.FastVectorQuantizer(cfg.code_dim, cfg.codebook_size, decay=cfg.decay,
                                      commitment_weight=cfg.commitment_weight, rotation_trick=False,
                                      backend=cfg.backend)


def vqpytorch_quantizer(cfg: Config) -> nn.Module:
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(cfg.code_dim, cfg.codebook_size, decay=cfg.decay,
                          commitment_weight=cfg.commitment_weight, rotation_trick=False)


def deep_vq_vae(cfg: Config, train: Tensor, test: Tensor, make_quantizer=fastvq_quantizer,
                name: str = "4 deep VQ-VAE (fastvq)") -> Result:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = DeepVQVAE(cfg, train.shape[1], lambda: make_quantizer(cfg))
    init_codebook_from_data(cfg, model, train)

    def step_loss(x: Tensor) -> Tensor:
        reconstruction, _, commitment = model(x)
        return ((reconstruction - x) / PIXEL_MAX).square().mean() + commitment

    train_network(cfg, model, train, step_loss, name)
    with torch.no_grad():
        reconstructions, indices, _ = model(test)
        codes = uniform_codes(cfg, cfg.codebook_size, (cfg.num_show, cfg.positions))  # z_j ~ U{1..K}
        samples = model.decode(model.quantizer.codebook[codes])
    seconds = time.perf_counter() - start
    perplexity, utilization = code_usage(indices, cfg.codebook_size)
    return Result(name, mse(reconstructions, test), seconds, reconstructions[: cfg.num_show], samples,
                  perplexity, utilization)


# ---- report -----------------------------------------------------------------------------------
def format_table(results: list[Result], num_codes: dict[str, int]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'model':<{width}} {'test MSE':>9} {'time s':>7} {'perplexity':>14} {'used':>6}"]
    for r in results:
        usage = (f"{r.perplexity:>8.1f} / {num_codes[r.name]:<4} {r.utilization:>6.0%}"
                 if r.perplexity is not None else f"{'-':>14} {'-':>6}")
        lines.append(f"{r.name:<{width}} {r.test_mse:>9.3f} {r.seconds:>7.2f} {usage}")
    return "\n".join(lines + [r.note for r in results if r.note])


def save_grid(results: list[Result], originals: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def strip(images: Tensor) -> Tensor:  # (n, 64) -> (8, n*9 - 1) with a one-pixel gap
        tiles = images.detach().float().clamp(0, PIXEL_MAX).view(-1, 8, 8)
        gap = torch.full((8, 1), float("nan"))
        return torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=1)

    columns = ("test originals", "reconstructions", "generated samples")
    fig, axes = plt.subplots(len(results), 3, figsize=(12, 0.75 * len(results) + 0.5), squeeze=False)
    for row, result in enumerate(results):
        for col, images in enumerate((originals, result.reconstructions, result.samples)):
            ax = axes[row][col]
            ax.imshow(strip(images).numpy(), cmap="gray_r", vmin=0, vmax=PIXEL_MAX, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
        axes[row][0].set_ylabel(result.name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout(h_pad=0.3, w_pad=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, out: Path | None = None, compare: bool = False) -> list[Result]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return run_models(cfg, out, compare)
    finally:
        torch.set_num_threads(previous_threads)


def run_models(cfg: Config, out: Path | None, compare: bool) -> list[Result]:
    train, test = load_split(cfg)
    steps = [shallow_vq_autoencoder, shallow_vq_vae, beta_vae, deep_vq_vae]
    results = [step(cfg, train, test) for step in progress(cfg, steps, "models")]
    num_codes = {r.name: cfg.shallow_codes for r in results[:2]} | {results[3].name: cfg.codebook_size}
    if compare:
        other = deep_vq_vae(cfg, train, test, vqpytorch_quantizer, "4 deep VQ-VAE (vector-quantize-pytorch)")
        results.append(other)
        num_codes[other.name] = cfg.codebook_size
    print(f"digits: {train.shape[0]} train / {test.shape[0]} test images, MSE per pixel in grey levels^2 (0..16)")
    print(format_table(results, num_codes))
    if compare:
        ours, theirs = results[3], results[4]
        print(f"deep VQ-VAE, same config and seed: fastvq test MSE {ours.test_mse:.3f} in {ours.seconds:.2f} s | "
              f"vector-quantize-pytorch test MSE {theirs.test_mse:.3f} in {theirs.seconds:.2f} s "
              f"({theirs.seconds / ours.seconds:.2f}x the time)")
    if out is not None:
        path = Path(out) / "samples.png"
        save_grid(results, test[: cfg.num_show], path)
        print(f"wrote {path}")
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for samples.png")
    parser.add_argument("--compare", action="store_true", help="also train model 4 with vector-quantize-pytorch")
    parser.add_argument("--epochs", type=int, default=Config.epochs, help="epochs of models 3 and 4")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--backend", default=Config.backend, help="fastvq backend (auto, cpu, torch, ...)")
    parser.add_argument("--threads", type=int, default=Config.threads, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    cfg = Config(seed=args.seed, epochs=args.epochs, backend=args.backend,
                 threads=args.threads, progress=not args.no_progress)
    return run(cfg, args.out, args.compare)


if __name__ == "__main__":
    main()
