"""contrastive-sc (Ciortan & Defrance 2021): an MLP trained with a SimCLR-style contrastive
loss, where two views of a cell are made by heavy input dropout.

As its authors ran it (github.com/ciortanmadalina/contrastive-sc, ``train.py``/``models.py``):
input = 500 HVG, library-size normalised, log1p, scaled; ``Dropout(0.9)`` on the input, then
Linear-BatchNorm-ReLU, Linear-BatchNorm-ReLU, Linear (layers 200-40-60), output L2-normalised;
the unsupervised SupCon loss (= NT-Xent over the 2B views, temperature 0.07); Adam at lr 0.4
with their cosine schedule computed against a 500-epoch horizon (so over 30 epochs the rate
only falls from 0.4 to ~0.397), batch 200, 30 epochs; the embedding is the eval-mode output.

The same network is mask-sc's teacher: trained on expression *fragments* of the grid genes
(see ``masksc.models.targets``) and frozen. For that use the input is the grid vector
(``g*s`` log-normalised values) standardised per gene by buffers fitted on the data, so a gene
outside the fragment is set to 0 = its mean, the neutral value.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from masksc.checks import is_finite_number, is_integer, is_number, plain_numbers
from masksc.progress import progress_bar
from masksc.rng import keeping_global_rngs

log = logging.getLogger(__name__)

_INTEGER_FIELDS = ("n_input", "lr_horizon_epochs", "epochs", "batch_size", "seed")


@dataclass(frozen=True)
class ContrastiveConfig:
    """Hyper-parameters of contrastive-sc (defaults = its authors' settings)."""

    n_input: int = 500
    layers: tuple[int, ...] = (200, 40, 60)
    dropout: float = 0.9
    temperature: float = 0.07
    lr: float = 0.4
    lr_horizon_epochs: int = 500  # the authors' cosine schedule is computed against 500 epochs
    epochs: int = 30
    batch_size: int = 200
    seed: int = 0
    standardize: bool = False  # teacher mode: standardise inputs with fitted per-gene buffers

    def __post_init__(self):
        if isinstance(self.layers, list) or (isinstance(self.layers, np.ndarray) and self.layers.ndim == 1):
            object.__setattr__(self, "layers", tuple(self.layers))  # a list from JSON or a user, as MaskSCConfig's
        wrong = [f"{name}={getattr(self, name)!r} must be {'an integer' if check is is_integer else 'a number'}"
                 for name, check in (*((name, is_integer) for name in _INTEGER_FIELDS),
                                     ("dropout", is_number), ("temperature", is_number), ("lr", is_number))
                 if not check(getattr(self, name))]
        if not (isinstance(self.layers, tuple) and all(is_integer(width) for width in self.layers)):
            wrong.append(f"layers={self.layers!r} must be integers (layer widths)")
        if isinstance(self.standardize, np.bool_):  # as MaskSCConfig takes its switches
            object.__setattr__(self, "standardize", bool(self.standardize))
        if not isinstance(self.standardize, bool):
            wrong.append(f"standardize={self.standardize!r} must be True or False")
        if wrong:  # before the comparisons below, which these would fail with a TypeError
            raise ValueError("contrastive-sc config: " + "; ".join(wrong) + ".")
        plain_numbers(self)
        problems = [msg for bad, msg in (
            (self.n_input < 1, f"n_input={self.n_input} must be >= 1"),
            (not self.layers or min(self.layers) < 1, f"layers={self.layers} must be one or more widths >= 1"),
            (not 0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"),
            (not (is_finite_number(self.temperature) and self.temperature > 0),
             f"temperature={self.temperature} must be a finite number > 0"),
            (not (is_finite_number(self.lr) and self.lr > 0), f"lr={self.lr} must be a finite number > 0"),
            (self.epochs < 1, f"epochs={self.epochs} must be >= 1"),
            (self.batch_size < 2, f"batch_size={self.batch_size} must be >= 2 (NT-Xent contrasts cells in a batch)"),
            (self.lr_horizon_epochs < 1, f"lr_horizon_epochs={self.lr_horizon_epochs} must be >= 1"),
        ) if bad]
        if problems:
            raise ValueError("contrastive-sc config: " + "; ".join(problems) + ".")

    @property
    def out_dim(self) -> int:
        """Width of the embedding: the last layer's."""
        return self.layers[-1]

    def replace(self, **kw) -> "ContrastiveConfig":
        """A copy with the fields in ``kw`` changed (checked as a new config is)."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """JSON-able fields (``from_dict`` restores an equal config)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ContrastiveConfig":
        """The config ``to_dict`` wrote; ValueError naming fields this masksc does not know, or
        missing ones (every release wrote them all: a default would silently build another model)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown ContrastiveConfig fields {sorted(unknown)}; the config comes from "
                             "another masksc version — retrain or upgrade masksc.")
        missing = [name for name in names if name not in d]
        if missing:
            raise ValueError(f"the teacher config lacks {missing}; it was edited — restore it from a copy or "
                             "retrain.")
        d = dict(d)
        for name in _INTEGER_FIELDS:  # a whole float (e.g. lr_horizon_epochs=500.0) was taken before its type was checked
            if isinstance(d.get(name), float) and d[name].is_integer():
                d[name] = int(d[name])
        if isinstance(d.get("layers"), list):  # JSON's; whole floats as ints, the rest refused by name
            d["layers"] = tuple(int(x) if isinstance(x, float) and x.is_integer() else x for x in d["layers"])
        return cls(**d)


class ContrastiveSC(nn.Module):
    """The contrastive-sc MLP. ``forward(x [B, n_input] float32) -> [B, out_dim]`` unit vectors."""

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        dims = [cfg.n_input, *cfg.layers]
        self.drop = nn.Dropout(cfg.dropout)
        self.fc1 = nn.Linear(dims[0], dims[1])
        # hidden layers end in BatchNorm + ReLU, the output layer is plain (a lone layer is the output)
        rest: list[nn.Module] = [nn.BatchNorm1d(dims[1]), nn.ReLU()] if len(dims) > 2 else []
        for i in range(1, len(dims) - 1):
            rest.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                rest += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
        self.rest = nn.Sequential(*rest)
        self.register_buffer("in_mean", torch.zeros(cfg.n_input))
        self.register_buffer("in_scale", torch.ones(cfg.n_input))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    @property
    def out_dim(self) -> int:
        """Width of the embedding (``cfg.out_dim``)."""
        return self.cfg.out_dim

    def fit_standardizer(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Set the per-gene input standardisation (teacher mode): z = (x - mean) / std; genes
        with std 0 (e.g. grid padding) get scale 0 so they always contribute 0."""
        std = np.asarray(std, dtype=np.float64)
        scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
        self.in_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.in_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_input] -> [B, n_input]; identity unless ``cfg.standardize``."""
        if not self.cfg.standardize:
            return x
        return (x - self.in_mean) * self.in_scale

    def head(self, h1: torch.Tensor) -> torch.Tensor:
        """Everything after the first linear layer: h1 [..., layers[0]] -> unit vectors [..., out_dim]."""
        shape = h1.shape
        out = self.rest(h1.reshape(-1, shape[-1]))
        return F.normalize(out, dim=-1).reshape(*shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor, standardized: bool = False) -> torch.Tensor:
        """x [B, n_input] float32 (raw, or already standardised when ``standardized``) -> [B, out_dim]."""
        z = x if standardized else self.standardize(x)
        return self.head(self.fc1(self.drop(z)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """NT-Xent (SimCLR; = SupCon without labels, as contrastive-sc uses it).

    z1, z2: [B, d] L2-normalised embeddings of two views of the same B cells. Each of the 2B
    views is an anchor whose positive is its other view; all other 2B-2 views are negatives.
    Returns the mean over the 2B anchors of -log softmax(positive), a scalar.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs two views of the same cells, both [B, d]; got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}. Pass the two views' embeddings of one batch.")
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, positive)


def authors_lr(cfg: ContrastiveConfig, epoch: int) -> float:
    """The authors' per-epoch cosine rate: eta_min = lr * 1e-3, horizon ``lr_horizon_epochs``."""
    eta_min = cfg.lr * 1e-3
    return eta_min + (cfg.lr - eta_min) * (1 + math.cos(math.pi * epoch / cfg.lr_horizon_epochs)) / 2


@keeping_global_rngs()
def fit_contrastive(model: ContrastiveSC, batches_fn, n_cells: int, device: str | torch.device = "cpu",
                    progress: bool = True) -> list[float]:
    """Train ``model`` with NT-Xent under its config (Adam, the authors' schedule).

    batches_fn(epoch, rng) -> iterable of inputs [b, n_input] float32 tensors (already
    standardised / restricted to a fragment as the caller wants; the two views come from the
    model's input dropout). Returns the mean loss per epoch. Leaves the model in eval mode.
    """
    cfg = model.cfg
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    losses: list[float] = []
    bar = progress_bar(range(cfg.epochs), desc="contrastive-sc", disable=not progress, leave=False)
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = authors_lr(cfg, epoch)
        total, n = 0.0, 0
        for x in batches_fn(epoch, rng):
            x = x.to(device)
            if x.shape[0] < 2:
                continue  # BatchNorm and NT-Xent need two cells
            loss = nt_xent(model(x, standardized=True), model(x, standardized=True), cfg.temperature)
            value = loss.item()
            if not math.isfinite(value):  # before the step, so the weights stay finite
                raise FloatingPointError(f"contrastive-sc loss became {value} at epoch {epoch + 1}; lower its learning "
                                         f"rate (lr={cfg.lr}: --teacher-set lr=..., teacher_overrides={{'lr': ...}}) "
                                         "or check the input for extreme values.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += value * x.shape[0]
            n += x.shape[0]
        losses.append(total / max(n, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        log.info("contrastive-sc epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    model.eval()
    return losses


@keeping_global_rngs()
def train_contrastive_dense(X: np.ndarray, cfg: ContrastiveConfig, device: str | torch.device = "cpu",
                            progress: bool = True) -> tuple[ContrastiveSC, list[float]]:
    """The contrastive-sc baseline on a dense preprocessed matrix X [n, n_input] float32 (e.g. the
    authors' 500 scaled HVG). Returns the trained (eval-mode) model and per-epoch losses."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != cfg.n_input:
        raise ValueError(f"X has shape {X.shape}, expected [n, {cfg.n_input}]; set ContrastiveConfig.n_input "
                         "to the number of genes.")
    torch.manual_seed(cfg.seed)
    model = ContrastiveSC(cfg)
    if cfg.standardize:
        model.fit_standardizer(X.mean(0), X.std(0))
    Xt = torch.from_numpy(X)

    def batches(epoch, rng):
        idx = rng.permutation(len(X))
        for s in range(0, len(X), cfg.batch_size):
            yield model.standardize(Xt[idx[s:s + cfg.batch_size]].to(device))  # the model is on device

    losses = fit_contrastive(model, batches, len(X), device=device, progress=progress)
    return model, losses


@torch.no_grad()
def embed_dense(model: ContrastiveSC, X: np.ndarray, batch_size: int = 4096,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Eval-mode embedding of a dense matrix X [n, n_input] -> float32 [n, out_dim]."""
    model.eval().to(device)
    out = [model(torch.as_tensor(X[s:s + batch_size], dtype=torch.float32, device=device)).cpu()
           for s in range(0, len(X), batch_size)]
    return torch.cat(out).numpy()
