"""Train the toy FLUX pipeline from scratch on the synthetic world (CPU, minutes).

Two stages:

1. the VAE (AutoencoderKL) learns to reconstruct rendered shapes; its latent mean and
   standard deviation give ``shift_factor`` and ``scaling_factor`` (as for FLUX's VAE);
2. the transformer and both text encoders are trained jointly with the rectified-flow
   (flow-matching) loss on the VAE latents, using exactly the text encoding, latent
   packing, position ids, timestep and guidance conventions of ``diffusers.FluxPipeline``.

The result is written with ``FluxPipeline.save_pretrained`` (safetensors only) plus the
sampling recipe (``toy_recipe.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import classifier, world
from .config import ToyConfig
from .models import (
    build_clip_tokenizer,
    build_scheduler,
    build_t5_tokenizer,
    build_text_encoders,
    build_transformer,
    build_vae,
    count_parameters,
)

logger = logging.getLogger(__name__)

TRAIN_INFO_FILE = "toy_train.json"


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 5% of the peak."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


class _Progress:
    """Log a line every ``every`` steps with loss, speed and ETA."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.t0 = time.perf_counter()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            dt = time.perf_counter() - self.t0
            eta = dt / (i + 1) * (self.total - i - 1)
            avg = float(np.mean(self.losses[-self.every :]))
            logger.info("%s step %d/%d loss %.4f (%.1f s, eta %.0f s)", self.name, i + 1, self.total, avg, dt, eta)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


class _Ema:
    """Exponential moving average of a module's parameters (shipped instead of the raw ones)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, module.parameters()):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)


# --------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------


def train_vae(cfg: ToyConfig, images: np.ndarray, seed: int, log_every: int = 100):
    """Train the VAE on ``images`` (uint8 ``(N, H, W, 3)``); see :func:`set_latent_scaling`."""
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    logger.info("VAE: %d parameters, latent %dx%dx%d", count_parameters(vae), cfg.vae_latent_channels, cfg.latent_size,
                cfg.latent_size)
    x_all = _images_to_tensor(images)  # (N, 3, H, W)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.vae_steps // 10, cfg.vae_steps))
    pixels = 3 * cfg.image_size * cfg.image_size
    progress = _Progress("vae", cfg.vae_steps, log_every)
    vae.train()
    for i in range(cfg.vae_steps):
        x = x_all[torch.randint(0, len(x_all), (cfg.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        kl = post.kl().mean() / pixels
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.step(i, loss.item())
    vae.eval()
    logger.info("VAE trained in %.0f s", progress.seconds)
    return vae


def set_latent_scaling(vae, latent_mean: torch.Tensor) -> None:
    """Set ``shift_factor``/``scaling_factor`` so the pipeline's latents have mean 0, std 1 (as FLUX)."""
    shift, scale = float(latent_mean.mean()), float(1.0 / latent_mean.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    logger.info("VAE shift_factor %.4f scaling_factor %.4f", shift, scale)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE for every image, each ``(N, C, h, w)``."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        post = vae.encode(_images_to_tensor(images[start : start + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_error(vae, samples: world.Samples) -> tuple[float, float]:
    """Mean absolute reconstruction error (0..255 units, posterior mode) and the share of
    reconstructions the classifier still labels correctly."""
    x = _images_to_tensor(samples.images)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)  # (N, 3, H, W)
    err = float((rec - x).abs().mean() * 127.5)
    rec_u8 = rec.add(1.0).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    preds = classifier.classify_batch(rec_u8)
    acc = float(np.mean([p == (s, c) for p, s, c in zip(preds, samples.shapes, samples.colours)]))
    return err, acc


# --------------------------------------------------------------------------------------
# Stage 2: transformer + text encoders
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextBatchIds:
    """Token ids of a caption list, padded as ``FluxPipeline.encode_prompt`` pads them."""

    clip: torch.Tensor  # (N, clip max length)
    t5: torch.Tensor  # (N, max_sequence_length)


def tokenize_like_flux(clip_tok, t5_tok, captions: list[str], max_sequence_length: int) -> TextBatchIds:
    """Tokenize exactly as ``FluxPipeline._get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds``."""
    clip = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt")
    t5 = t5_tok(captions, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt")
    return TextBatchIds(clip=clip.input_ids, t5=t5.input_ids)


def sample_sigmas(n: int, mu: float, gen: torch.Generator) -> torch.Tensor:
    """Noise levels in (0, 1): half logit-normal, half uniform, then FLUX's time shift ``mu``."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.5
    u = torch.where(pick, u, uniform).clamp(1e-4, 1 - 1e-4)
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def train_base(
    cfg: ToyConfig,
    captions: list[str],
    latents: tuple[torch.Tensor, torch.Tensor],
    vae_config,
    clip_tok,
    t5_tok,
    seed: int,
    log_every: int = 100,
):
    """Jointly train the transformer and both text encoders; returns the three models.

    ``latents`` is the VAE posterior ``(mean, std)`` of each caption's image, each
    ``(N, C, h, w)``; ``vae_config`` gives the pipeline's ``shift_factor``/``scaling_factor``.
    """
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    torch.manual_seed(seed)
    clip_model, t5_model = build_text_encoders(cfg, clip_tok, t5_tok)
    transformer = build_transformer(cfg)
    logger.info(
        "transformer %d params, CLIP %d, T5 %d; %d image tokens + %d text tokens",
        count_parameters(transformer),
        count_parameters(clip_model),
        count_parameters(t5_model),
        cfg.image_tokens,
        cfg.text_max_length,
    )
    scheduler = build_scheduler()
    sc = scheduler.config
    mu = calculate_shift(cfg.image_tokens, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)

    mean, std = latents  # (N, C, h, w) each
    shift, scale = vae_config.shift_factor, vae_config.scaling_factor
    ids = tokenize_like_flux(clip_tok, t5_tok, captions, cfg.text_max_length)
    n = len(captions)

    b, c, h, w = cfg.batch, cfg.vae_latent_channels, cfg.latent_size, cfg.latent_size
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)  # (h/2*w/2, 3)
    txt_ids = torch.zeros(cfg.text_max_length, 3)

    modules = torch.nn.ModuleList([transformer, clip_model, t5_model])
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(seed + 1)
    ema = _Ema(modules, cfg.ema_decay)
    progress = _Progress("base", cfg.steps, log_every)
    modules.train()
    for i in range(cfg.steps):
        idx = torch.randint(0, n, (b,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        z = (z - shift) * scale  # (B, C, h, w), the normalised latents the pipeline samples
        noise = torch.randn(z.shape, generator=gen)
        sigma = sample_sigmas(b, mu, gen)  # (B,)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * z + s * noise
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)  # (B, h/2*w/2, 4C)
        target = FluxPipeline._pack_latents(noise - z, b, c, h, w)  # velocity, same layout

        # CLIP caption augmentation: some pooled vectors come from a random other caption,
        # so the content has to be read from the T5 tokens through attention (as in FLUX).
        clip_idx = torch.where(
            torch.rand(b, generator=gen) < cfg.clip_shuffle, torch.randint(0, n, (b,), generator=gen), idx
        )
        clip_ids = ids.clip[clip_idx]
        pooled = clip_model(clip_ids).pooler_output  # (B, clip_hidden)
        prompt_embeds = t5_model(ids.t5[idx])[0]  # (B, L, t5_d_model)
        guidance = torch.empty(b).uniform_(*cfg.guidance_range, generator=gen)

        pred = transformer(
            hidden_states=packed,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(modules, i)
        progress.step(i, loss.item())
    ema.copy_to(modules)
    modules.eval()
    logger.info("base model trained in %.0f s", progress.seconds)
    return transformer, clip_model, t5_model


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def save_pipeline(folder: Path, cfg: ToyConfig, vae, transformer, clip_model, t5_model, clip_tok, t5_tok) -> Path:
    """Write a complete FluxPipeline folder (safetensors only) plus the sampling recipe."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=clip_model,
        tokenizer=clip_tok,
        text_encoder_2=t5_model,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _write_slow_clip_files(folder / "tokenizer", clip_tok)
    cfg.recipe.save(folder)
    return folder


def _write_slow_clip_files(folder: Path, clip_tok) -> None:
    """Also write ``vocab.json``/``merges.txt`` so older (slow) CLIPTokenizer classes load it."""
    data = json.loads(clip_tok.backend_tokenizer.to_str())
    (folder / "vocab.json").write_text(json.dumps(clip_tok.get_vocab(), ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def train(out: Path, cfg: ToyConfig | None = None, seed: int = 0, log_every: int = 100) -> Path:
    """Build, train and save the toy pipeline into ``out``; returns ``out``."""
    cfg = cfg or ToyConfig()
    t0 = time.perf_counter()
    # Denormal floats slow CPU training down up to 10x; this process-wide switch stays on.
    torch.set_flush_denormal(True)
    clip_tok, t5_tok = build_clip_tokenizer(cfg), build_t5_tokenizer(cfg)
    logger.info("tokenizers: CLIP %d tokens, T5 %d tokens", len(clip_tok), len(t5_tok))
    samples = world.training_samples(cfg.num_samples, seed=seed, size=cfg.image_size)
    logger.info("rendered %d training samples in %.1f s", len(samples), time.perf_counter() - t0)
    vae = train_vae(cfg, samples.images, seed, log_every)
    latents = encode_latents(vae, samples.images)
    set_latent_scaling(vae, latents[0])
    holdout = world.training_samples(256, seed=seed + 10_000, size=cfg.image_size)
    rec_err, rec_acc = vae_reconstruction_error(vae, holdout)
    logger.info("VAE on held-out renders: error %.2f / 255, classifier accuracy %.1f%%", rec_err, 100 * rec_acc)
    transformer, clip_model, t5_model = train_base(
        cfg, samples.captions, latents, vae.config, clip_tok, t5_tok, seed, log_every
    )
    for m in (vae, transformer, clip_model, t5_model):
        m.requires_grad_(False)
    save_pipeline(out, cfg, vae, transformer, clip_model, t5_model, clip_tok, t5_tok)
    info = {
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "vae_reconstruction_mae": round(rec_err, 3),
        "vae_reconstruction_classifier_accuracy": rec_acc,
        "config": dataclasses.asdict(cfg),
    }
    (out / TRAIN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", out, time.perf_counter() - t0)
    return out
