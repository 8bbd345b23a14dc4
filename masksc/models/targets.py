"""Sequence-level targets for masked patches: the frozen teacher applied to an expression
*fragment* of the cell.

The paper says each masked patch is regressed onto "a sequence-level feature" from a frozen
contrastive-sc encoder, without pinning down which genes that feature is computed from. We
define three fragments on the ``g x s`` gene grid (patch = ``P x P`` block, patches numbered
row-major over the ``(g/P) x (s/P)`` patch grid):

- ``"patch"``: the patch's own ``P*P`` genes. Most local; with ~90-99% zeros most patches
  are empty, and an empty patch's target carries nothing of the cell: it depends only on the
  patch's place (the teacher's standardised zeros and its first layer's columns there).
- ``"row"``: the band of ``P`` grid rows that holds the patch, i.e. ``P*s`` genes. In HVG
  layout this is a contiguous run of HVG ranks — the "sequence" of genes the patch is part
  of — so the target carries context a 16-gene patch cannot, while still differing between
  patches of a cell (g/P targets per cell).
- ``"cell"`` (default): every grid gene; one target per cell, shared by all its patches
  (masked prediction then distils the cell-level contrastive embedding into an encoder that
  must infer it from the unmasked patches alone).

Measured on 10x PBMC (48 x 48 grid, same small model and budget, k-means ARI of the
mean-pooled encoder embedding): ``cell`` 0.49 after 10 epochs vs ``row`` 0.27 after 10 epochs
and ``patch`` 0.31 after 4 epochs (``cell`` 0.41 at epoch 4). A teacher trained on
fragments embeds fragments, and only the whole-cell teacher separates cell types well by
itself (ARI 0.79 vs 0.29 for the row teacher applied to whole cells), so ``cell`` is the
default. The README (results) lists these runs.

With IME off the tokens are runs of ``P*P`` consecutive grid genes and the same fragment
names apply to them (``"row"`` is then the same gene band of ``P*s`` consecutive genes).

The fragment input is the standardised cell with every gene outside the fragment set to 0
(its mean). The teacher's first layer is linear, so for a fragment F:
``fc1(x_F) = b + sum_{patches p in F} W1[:, genes(p)] @ x_p``. The per-patch partial products
are computed once per batch (``[B, G, P*P] x [G, P*P, H]``) and summed per fragment; no dense
copy of the cell per patch is ever made.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from masksc.errors import DataError
from masksc.models.contrastive import ContrastiveConfig, ContrastiveSC
from masksc.rng import keeping_global_rngs

FRAGMENTS = ("patch", "row", "cell")


def patch_columns(grid_shape: tuple[int, int], patch: int) -> np.ndarray:
    """Grid columns (row-major positions r*s + c) of each patch: int64 [G, P*P], patches row-major,
    the P*P genes of a patch in row-major order inside the patch (the Conv2d kernel order)."""
    g, s = grid_shape
    gp, sp_ = g // patch, s // patch
    pr, pc = np.meshgrid(np.arange(gp), np.arange(sp_), indexing="ij")
    ir, ic = np.meshgrid(np.arange(patch), np.arange(patch), indexing="ij")
    rows = pr.reshape(-1, 1) * patch + ir.reshape(1, -1)
    cols = pc.reshape(-1, 1) * patch + ic.reshape(1, -1)
    return (rows * s + cols).astype(np.int64)


def token_columns(grid_shape: tuple[int, int], patch: int, ime: bool = True) -> np.ndarray:
    """Grid columns of each token: int64 [G, P*P]. IME on: the 2-D ``P x P`` patches
    (``patch_columns``); IME off: runs of ``P*P`` consecutive grid positions (1-D gene
    sequences in layout order, HVG rank under the ``hvg`` layout). DataError for a grid the
    patch does not divide (its last rows or columns would belong to no token)."""
    g, s = grid_shape
    if patch < 1 or g % patch or s % patch:
        raise DataError(f"grid {g}x{s} is not divisible into {patch}x{patch} patches; fix: pass the model's "
                        "config.grid_shape and config.patch.")
    if ime:
        return patch_columns(grid_shape, patch)
    n_tokens = (g // patch) * (s // patch)
    return np.arange(n_tokens * patch * patch, dtype=np.int64).reshape(n_tokens, patch * patch)


def fragment_of_patch(grid_shape: tuple[int, int], patch: int, fragment: str) -> np.ndarray:
    """Fragment index of each patch: int64 [G] with values in [0, n_fragments)."""
    if fragment not in FRAGMENTS:
        raise ValueError(f"unknown target fragment {fragment!r}; choose one of {FRAGMENTS}.")
    g, s = grid_shape
    n_patches = (g // patch) * (s // patch)
    if fragment == "patch":
        return np.arange(n_patches, dtype=np.int64)
    if fragment == "row":
        return np.arange(n_patches, dtype=np.int64) // (s // patch)
    return np.zeros(n_patches, dtype=np.int64)


def fragment_gene_mask(grid_shape: tuple[int, int], patch: int, fragment: str, ime: bool = True) -> np.ndarray:
    """bool [n_fragments, g*s]: which grid genes each fragment contains (for tests and the
    teacher's fragment training)."""
    frag = fragment_of_patch(grid_shape, patch, fragment)
    cols = token_columns(grid_shape, patch, ime)
    mask = np.zeros((frag.max() + 1, grid_shape[0] * grid_shape[1]), dtype=bool)
    for p, f in enumerate(frag):
        mask[f, cols[p]] = True
    return mask


class FragmentTargets(torch.nn.Module):
    """Computes teacher(fragment) for every patch of a batch, efficiently.

    Holds the grid geometry (no parameters); the teacher is passed per call so it is owned
    (and saved) by the model only once.
    """

    def __init__(self, grid_shape: tuple[int, int], patch: int, fragment: str, ime: bool = True):
        super().__init__()
        self.grid_shape = tuple(grid_shape)
        self.patch = patch
        self.fragment = fragment
        frag = fragment_of_patch(self.grid_shape, patch, fragment)
        self.n_fragments = int(frag.max()) + 1
        self.register_buffer("cols", torch.from_numpy(token_columns(self.grid_shape, patch, ime)), persistent=False)
        self.register_buffer("frag", torch.from_numpy(frag), persistent=False)
        onehot = torch.zeros(self.n_fragments, len(frag))
        onehot[torch.from_numpy(frag), torch.arange(len(frag))] = 1.0
        self.register_buffer("assign", onehot, persistent=False)

    @torch.no_grad()
    def forward(self, teacher: ContrastiveSC, dense_grid: torch.Tensor) -> torch.Tensor:
        """dense_grid [B, g*s] float32 (the cells in grid order) -> targets [B, G, F] float32,
        F = teacher.out_dim. The teacher must be in eval mode (frozen)."""
        z = teacher.standardize(dense_grid.float())                      # [B, g*s]
        zp = z[:, self.cols]                                               # [B, G, PP]
        w1 = teacher.fc1.weight.t()[self.cols]                             # [G, PP, H]
        partial = torch.einsum("bgk,gkh->bgh", zp, w1)                     # [B, G, H]
        h1 = torch.einsum("fg,bgh->bfh", self.assign, partial) + teacher.fc1.bias
        out = teacher.head(h1)                                             # [B, n_frag, F]
        return out[:, self.frag]                                           # [B, G, F]


def fragment_batches(dense_grid: torch.Tensor, gene_mask: torch.Tensor, generator: torch.Generator,
                     candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher training input: each cell restricted to one random fragment.

    dense_grid [B, g*s] standardised; gene_mask bool [n_frag, g*s]; candidates optional int64
    indices of fragments to draw from (e.g. fragments that are not all padding).
    Returns [B, g*s] with genes outside the drawn fragment set to 0.
    """
    n = gene_mask.shape[0] if candidates is None else len(candidates)
    pick = torch.randint(0, n, (dense_grid.shape[0],), generator=generator)
    if candidates is not None:
        pick = candidates[pick]
    return dense_grid * gene_mask[pick].to(dense_grid.device, dense_grid.dtype)


def gene_mean_std(X_grid_csr) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of a sparse matrix [n, m] -> two float64 [m]."""
    n = X_grid_csr.shape[0]
    mean = np.asarray(X_grid_csr.sum(axis=0), dtype=np.float64).ravel() / n
    sq = np.asarray(X_grid_csr.multiply(X_grid_csr).sum(axis=0), dtype=np.float64).ravel() / n
    return mean, np.sqrt(np.maximum(sq - mean ** 2, 0.0))


def auto_teacher_dropout(X_grid_csr, min_kept: float = 6.0, max_dropout: float = 0.9) -> float:
    """Input-dropout rate for the teacher: the authors' 0.9, lowered for very sparse data so
    that a view still keeps ``min_kept`` detected genes on average: min(0.9, 1 - min_kept / mean
    detected genes per cell). PBMC (~204 detected of 2000) -> 0.9; worm neurons (~20 detected of
    the top 2000) -> 0.69.
    Measured (teacher alone, k-means ARI, seed 0, 30 epochs; benchmarks/results/teacher_alone.json):
    worm all genes 0.459 at 0.9 vs 0.563 at the rule's 0.76 (0.534 at 0.6, 0.500 at 0.85); worm
    top-2000 file 0.506 at the rule's 0.69 (no run at 0.9); PBMC 0.805 at the rule's 0.9 vs 0.751
    at 0.8 and 0.790 at 0.95."""
    detected = X_grid_csr.getnnz() / max(1, X_grid_csr.shape[0])
    return float(np.clip(1.0 - min_kept / max(detected, 1e-9), 0.0, max_dropout))


# Set by the model's grid, not by the user: the teacher reads the standardised g*s grid vector.
GRID_BOUND_TEACHER_FIELDS = ("n_input", "standardize")


def teacher_config(model_cfg, seed: int = 0, X_grid_csr=None, **overrides) -> ContrastiveConfig:
    """The MED teacher's recipe for a mask-sc model config ``model_cfg`` (a MaskSCConfig):
    contrastive-sc at its authors' settings on the standardised g*s grid vector, seeded by
    ``seed``, with the input dropout of ``auto_teacher_dropout(X_grid_csr)`` when the cells
    (scipy CSR [n, g*s]) are given. ``overrides`` replace any other ContrastiveConfig field, e.g.
    ``epochs=5``, ``temperature=0.5``, ``dropout=0.8``, ``layers=(512, 128, 60)``; the last layer
    must equal ``model_cfg.target_dim``. Raises ValueError naming a bad field."""
    settable = sorted({f.name for f in dataclasses.fields(ContrastiveConfig)} - set(GRID_BOUND_TEACHER_FIELDS))
    unknown = sorted(set(overrides) - set(settable))
    if unknown:
        raise ValueError(f"teacher setting(s) {unknown} cannot be set; choose from {settable} (n_input and "
                         "standardize follow the model's grid).")
    recipe = {"seed": seed}
    if X_grid_csr is not None:
        recipe["dropout"] = auto_teacher_dropout(X_grid_csr)
    cfg = ContrastiveConfig(n_input=model_cfg.n_genes, standardize=True, **{**recipe, **overrides})
    if cfg.out_dim != model_cfg.target_dim:
        raise ValueError(f"the teacher's last layer is {cfg.out_dim} wide but the model's target_dim is "
                         f"{model_cfg.target_dim}; end teacher layers with {model_cfg.target_dim} or set "
                         f"target_dim={cfg.out_dim}.")
    return cfg


def check_grid_columns(X_grid_csr, grid_shape: tuple[int, int]) -> None:
    """Raise ValueError unless ``X_grid_csr`` [n, g*s] has one column per position of ``grid_shape``
    (g, s): a plain cells x genes matrix would be read as the grid's first positions, silently."""
    n_genes = grid_shape[0] * grid_shape[1]
    if X_grid_csr.shape[1] != n_genes:
        raise ValueError(f"X has {X_grid_csr.shape[1]} columns but the grid {tuple(grid_shape)} has {n_genes} "
                         "positions; pass GridLayout.to_grid(...) output of the model's grid.")


@keeping_global_rngs()
def fit_teacher(X_grid_csr, grid_shape: tuple[int, int], patch: int, fragment: str, cfg: ContrastiveConfig,
                is_padding: np.ndarray | None = None, ime: bool = True, device: str | torch.device = "cpu",
                progress: bool = True) -> ContrastiveSC:
    """Train the contrastive-sc teacher on expression fragments of the grid genes and freeze it.

    X_grid_csr: scipy CSR float32 [n, g*s] (GridLayout.to_grid output). Each training cell is
    restricted to one random fragment of type ``fragment`` (fragments that are all padding are
    never drawn); the two views come from the teacher's input dropout. ``cfg``: the teacher's
    ContrastiveConfig (``teacher_config`` gives the recipe ``fit`` uses).
    Returns the teacher in eval mode with requires_grad off.
    """
    from masksc.models.contrastive import fit_contrastive

    check_grid_columns(X_grid_csr, grid_shape)
    n_genes = grid_shape[0] * grid_shape[1]
    if cfg.n_input != n_genes or not cfg.standardize:
        raise ValueError("the teacher config needs n_input = g*s and standardize=True.")
    torch.manual_seed(cfg.seed)
    teacher = ContrastiveSC(cfg)
    teacher.fit_standardizer(*gene_mean_std(X_grid_csr))
    gene_mask = torch.from_numpy(fragment_gene_mask(grid_shape, patch, fragment, ime))
    pad = np.zeros(n_genes, bool) if is_padding is None else np.asarray(is_padding, bool)
    real = (gene_mask & ~torch.from_numpy(pad)).any(dim=1)
    candidates = torch.nonzero(real).flatten()
    X = X_grid_csr.tocsr().astype(np.float32)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches(epoch, rng):
        order = rng.permutation(X.shape[0])
        for s in range(0, len(order), cfg.batch_size):
            # on the teacher's device (fit_contrastive moved it there); fragments are drawn on the CPU
            dense = torch.from_numpy(X[order[s:s + cfg.batch_size]].toarray()).to(device)
            z = teacher.standardize(dense)
            yield z if fragment == "cell" else fragment_batches(z, gene_mask, gen, candidates)

    fit_contrastive(teacher, batches, X.shape[0], device=device, progress=progress)
    teacher.cpu().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
