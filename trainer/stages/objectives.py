"""The training objectives (design §3.4): one table, :data:`OBJECTIVES`, the only place that knows them.

Each step's loss is ``λ_u·L_unlearn + λ_p·L_preserve`` with one objective per role (or ``none``):

* ``anchor`` (unlearn): ``MSE(v_adapter(unsafe), v_base(anchor))`` — the unsafe prompt should move
  like its safe rewrite;
* ``deviate`` (unlearn, the authors'): ``tanh(−MSE(v_adapter(unsafe), v_base(unsafe)))``; its
  gradient vanishes at the identity, so its generators start from N(0, 0.1²);
* ``distill`` (preserve): ``MSE(v_adapter(safe), v_base(safe))`` — no images needed;
* ``flow`` (preserve): the flow-matching loss ``MSE(v_adapter(caption), ε − x₀)`` on an
  image-caption folder.

An :class:`Objective` names the data it reads (``needs``): prompt sets ``unsafe``, ``anchors``,
``safe`` and ``images`` (an image-caption folder, whose captions are encoded too). The run's
checks read exactly those inputs, and the step calls :attr:`Objective.loss` with the trainer
(its draws, latents and model calls; :class:`trainer.stages.train.Trainer`) and the step's
random generator. The order of the random draws inside a loss is part of a run's
reproducibility.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .train import Trainer

#: The name that switches a role off.
NONE = "none"
#: The roles, in the order a step computes them, with their config keys (objective, weight, noise levels).
ROLES = ("unlearn", "preserve")
#: What an objective may need: the prompt sets of the run config and an image-caption folder.
DATA = ("unsafe", "anchors", "safe", "images")


@dataclass(frozen=True)
class Objective:
    """One training objective: its name, role, the data it reads, and its loss."""

    name: str
    role: str  # one of ROLES
    needs: tuple[str, ...]  # items of DATA
    loss: Callable[[Trainer, torch.Generator], Tensor]
    summary: str
    init_std: float = 0.0  # generator initialisation it needs (0: the identity)

    def __post_init__(self) -> None:
        if self.role not in ROLES or any(n not in DATA for n in self.needs) or self.name == NONE:
            raise ValueError(f"bad objective {self}")


def _anchor(tr: Trainer, gen: torch.Generator) -> Tensor:
    idx = tr.draw(tr.data.unsafe, gen)
    text, target_text = tr.rows(tr.data.unsafe, idx), tr.rows(tr.data.anchors, idx)
    sigma = tr.sigma(gen, tr.t.unlearn_sigmas)
    x = tr.latents(gen, target_text, sigma)
    pred, target = tr.pair(x, sigma, text, target_text)
    return F.mse_loss(pred, target)


def _deviate(tr: Trainer, gen: torch.Generator) -> Tensor:
    idx = tr.draw(tr.data.unsafe, gen)
    text = tr.rows(tr.data.unsafe, idx)
    sigma = tr.sigma(gen, tr.t.unlearn_sigmas)
    x = tr.latents(gen, text, sigma)
    pred, target = tr.pair(x, sigma, text, text)
    return torch.tanh(-F.mse_loss(pred, target))


def _distill(tr: Trainer, gen: torch.Generator) -> Tensor:
    idx = tr.draw(tr.data.safe, gen)
    text = tr.rows(tr.data.safe, idx)
    sigma = tr.sigma(gen, tr.t.preserve_sigmas)
    x = tr.latents(gen, text, sigma)
    pred, target = tr.pair(x, sigma, text, text)
    return F.mse_loss(pred, target)


def _flow(tr: Trainer, gen: torch.Generator) -> Tensor:
    idx = tr.draw(tr.data.captions, gen)
    text = tr.rows(tr.data.captions, idx)
    sigma = tr.sigma(gen, tr.t.preserve_sigmas)
    x0 = tr.caller.from_vae(tr.data.image_latents[idx].to(tr.runtime.device, tr.caller.dtype))  # VAE latents -> model input
    eps = tr.caller.noise(len(idx), gen)
    x = (1.0 - sigma) * x0 + sigma * eps
    with tr.runtime.autocast():
        pred = tr.caller.velocity(x, torch.full((len(idx),), sigma), text).float()
    return F.mse_loss(pred, (eps - x0).float())


#: Every objective by name (``train.unlearn`` / ``train.preserve`` take these names, or ``none``).
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("anchor", "unlearn", ("unsafe", "anchors"), _anchor,
              "the unsafe prompt should move like its safe rewrite (paired anchors)"),
    Objective("deviate", "unlearn", ("unsafe",), _deviate,
              "move away from the base model on the unsafe prompt (the authors')", init_std=0.1),
    Objective("distill", "preserve", ("safe",), _distill, "match the base model on safe prompts (no images)"),
    Objective("flow", "preserve", ("images",), _flow, "flow matching on an image-caption folder"),
)}


def choices(role: str) -> tuple[str, ...]:
    """The names a role's config key accepts: its objectives, then ``none``."""
    return tuple(name for name, o in OBJECTIVES.items() if o.role == role) + (NONE,)


def chosen(*names: str) -> list[Objective]:
    """The objectives of ``names`` (``none`` skipped), in the given order."""
    return [OBJECTIVES[n] for n in names if n != NONE]


def needs(*names: str) -> set[str]:
    """Everything the objectives of ``names`` read (items of :data:`DATA`)."""
    return {item for o in chosen(*names) for item in o.needs}
