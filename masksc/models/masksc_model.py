"""mask-sc (Mo, NeurIPS 2024): masked expression modeling on a gene grid.

Tokens are the ``P x P`` patches of the ``g x s`` gene grid (IME), embedded from the sparse
CSR batch by ``masksc.ops.patch_embed``, plus fixed 2-D sin-cos positions and a learnable
global token. A random 1 - mask_ratio of the patches (``masksc.ops.random_masking``) goes
through a pre-LN ViT encoder; a light decoder gets them back with mask tokens
(``masksc.ops.unmask``) and predicts, per masked patch, the frozen teacher's feature of the
patch's fragment (MED, see ``targets.py``) or the patch's own values (MED off, MAE-style).
Loss: MSE over masked patches that are not all grid padding. Inference: encoder on all
patches, final LayerNorm, mean over the non-padding patch tokens.

All attention, patch embedding, masking and unmasking goes through ``masksc.ops``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from masksc import ops
from masksc.checks import is_finite_number, is_integer, is_number, plain_numbers
from masksc.data.grid import ORDERS
from masksc.kernels.patch_embed_ref import check_csr
from masksc.models.contrastive import ContrastiveSC
from masksc.models.targets import FRAGMENTS, FragmentTargets, token_columns

CONFIG_VERSION = 1
POOLS = ("mean", "cls", "target")
# Integer size fields and their smallest value, checked before the divisibility rules that use them.
_SIZE_FIELDS = {"patch": 1, "embed_dim": 1, "depth": 1, "num_heads": 1, "decoder_dim": 1, "decoder_depth": 1,
                "decoder_heads": 1, "target_dim": 1, "epochs": 1, "batch_size": 1}


def check_recipe(lr, weight_decay, betas, warmup_epochs, clip) -> None:
    """Refuse optimisation settings AdamW would reject late (after the teacher has trained) or
    silently misuse (a negative clip turning clipping off, a negative warm-up, a bool taken for
    a number). Numbers of any Python or numpy real type pass."""
    bad = []
    if not (is_number(lr) and 0 < lr < math.inf):
        bad.append(f"lr={lr!r} must be a number > 0")
    if not (is_number(weight_decay) and 0 <= weight_decay < math.inf):
        bad.append(f"weight_decay={weight_decay!r} must be a number >= 0")
    if not isinstance(betas, tuple) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        bad.append(f"betas={betas!r} must be two numbers in [0, 1)")
    if not (is_number(warmup_epochs) and 0 <= warmup_epochs < math.inf):
        bad.append(f"warmup_epochs={warmup_epochs!r} must be a number >= 0")
    if not (is_number(clip) and 0 <= clip < math.inf):
        bad.append(f"clip={clip!r} must be a number >= 0 (0: no clipping)")
    if bad:
        raise ValueError("; ".join(bad) + ".")


@dataclass(frozen=True)
class MaskSCConfig:
    """Architecture, objective and training recipe of a mask-sc model (saved with checkpoints)."""

    grid_shape: tuple[int, int] = (48, 48)
    patch: int = 4
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    ime: bool = True                 # False: 1-D tokens of P*P consecutive genes, 1-D positions
    med: bool = True                 # False: reconstruct the patch values (MAE) instead of teacher features
    target_fragment: str = "cell"    # "patch" | "row" | "cell" (see targets.py; "cell" measured best)
    target_dim: int = 60             # teacher output size (MED on)
    target_scale: float = 0.0        # multiply teacher targets by this; 0 = sqrt(target_dim) (unit-variance elements)
    norm_pix: bool = False           # MED off: standardise each patch's target values
    pool: str = "mean"               # embedding: "mean" of the non-padding patch tokens, "cls", or "target"
    layout: str = "hvg"              # gene order in the grid ("hvg" | "correlation"), used by the data layer
    # training recipe (TrainConfig.from_model_config reads these)
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = 2
    clip: float = 1.0

    def __post_init__(self):
        for name in ("grid_shape", "betas"):  # a list from JSON or a user: hashable; anything else stays, and fails
            if isinstance(getattr(self, name), (list, tuple, np.ndarray)):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        plain_numbers(self)
        for name, least in _SIZE_FIELDS.items():
            value = getattr(self, name)
            if not is_integer(value) or value < least:
                raise ValueError(f"{name}={value!r} must be an integer >= {least}.")
        switches = [f"{name}={getattr(self, name)!r}" for name in ("ime", "med", "norm_pix")
                    if not isinstance(getattr(self, name), bool)]
        if switches:  # a string such as "False" would count as on
            raise ValueError(f"{', '.join(switches)}: a switch must be true or false (--set ime=false).")
        if not isinstance(self.grid_shape, tuple) or len(self.grid_shape) != 2 or \
                not all(is_integer(x) and x >= 1 for x in self.grid_shape):
            raise ValueError(f"grid_shape={self.grid_shape!r} must be two positive integers (rows, columns).")
        g, s = self.grid_shape
        if g % self.patch or s % self.patch:
            raise ValueError(f"grid {self.grid_shape} is not divisible by patch {self.patch}; pick a grid whose "
                             "sides are multiples of the patch size.")
        if self.embed_dim % self.num_heads or self.decoder_dim % self.decoder_heads:
            raise ValueError("embed_dim / decoder_dim must be divisible by num_heads / decoder_heads.")
        step = 4 if self.ime else 2  # sin-cos positions: half the channels per grid axis (IME), sin and cos
        if self.embed_dim % step or self.decoder_dim % step:
            raise ValueError(f"embed_dim={self.embed_dim} and decoder_dim={self.decoder_dim} must be multiples of "
                             f"{step} for the sin-cos position embedding{' over the 2-D grid' if self.ime else ''}.")
        narrowest = min(self.embed_dim, self.decoder_dim)
        if not (is_number(self.mlp_ratio) and math.isfinite(self.mlp_ratio)
                and int(narrowest * self.mlp_ratio) >= 1):
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be a number giving the MLPs at least one hidden unit "
                             f"(>= {1 / narrowest:.3g} for width {narrowest}).")
        if not (is_number(self.mask_ratio) and 0.0 < self.mask_ratio < 1.0):
            raise ValueError(f"mask_ratio={self.mask_ratio!r} must be a number in (0, 1).")
        if self.n_keep >= self.n_patches:
            raise ValueError(f"mask_ratio={self.mask_ratio} masks no patch of {self.n_patches} (it keeps "
                             f"round({self.n_patches} * (1 - mask_ratio)) = {self.n_keep}), so there is nothing to "
                             f"predict; fix: mask_ratio >= {1 / self.n_patches:.3g} (one patch in {self.n_patches}).")
        if self.layout not in ORDERS:
            raise ValueError(f"layout={self.layout!r}; choose one of {ORDERS}.")
        if self.layout == "correlation" and not self.ime:
            # the layout fills P x P patches with co-expression modules; 1-D tokens are runs of a
            # grid row, so each would take a row from P modules rather than one module
            raise ValueError("layout='correlation' groups co-expressed genes into P x P patches, which only 2-D "
                             "patch tokens keep together; fix: ime=True, or layout='hvg' for 1-D tokens.")
        if not (is_finite_number(self.target_scale) and self.target_scale >= 0):
            raise ValueError(f"target_scale={self.target_scale!r} must be a finite number >= 0 (0: sqrt(target_dim)).")
        if self.norm_pix and not self.med and self.patch == 1:
            raise ValueError("norm_pix=True standardises each token's P*P values, which patch=1 leaves one of (its "
                             "variance is undefined); fix: norm_pix=False, or patch >= 2.")
        check_recipe(self.lr, self.weight_decay, self.betas, self.warmup_epochs, self.clip)
        if self.target_fragment not in FRAGMENTS:
            raise ValueError(f"target_fragment={self.target_fragment!r}; choose one of {FRAGMENTS}.")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}; choose one of {POOLS}.")
        if self.pool == "target" and not self.med:
            raise ValueError("pool='target' reads out the predicted teacher feature, which needs MED on; "
                             "use pool='mean' with med=False.")

    @property
    def n_patches(self) -> int:
        """Tokens G of a cell: (g / P) * (s / P)."""
        return (self.grid_shape[0] // self.patch) * (self.grid_shape[1] // self.patch)

    @property
    def n_genes(self) -> int:
        """Grid positions g * s: the columns of the matrices the model reads."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def n_keep(self) -> int:
        """Tokens left visible in training: G * (1 - mask_ratio), rounded, at least 1."""
        return max(1, int(round(self.n_patches * (1.0 - self.mask_ratio))))

    @property
    def out_dim(self) -> int:
        """Width of the decoder's predictions: target_dim with MED, else a patch's P * P values."""
        return self.target_dim if self.med else self.patch * self.patch

    @property
    def embedding_dim(self) -> int:
        """Width of a cell embedding: target_dim under pool='target', else embed_dim."""
        return self.target_dim if self.pool == "target" else self.embed_dim

    def replace(self, **kw) -> "MaskSCConfig":
        """A copy with the fields in ``kw`` changed; ValueError naming unknown fields or bad values."""
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise ValueError(f"unknown MaskSCConfig field(s) {unknown}; fix: use one of {valid}.")
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """JSON-able fields with the config version (``from_dict`` restores an equal config)."""
        d = dataclasses.asdict(self)
        d["grid_shape"] = list(self.grid_shape)
        d["betas"] = list(self.betas)
        d["config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaskSCConfig":
        """The config ``to_dict`` wrote; ValueError for another config version, unknown fields or
        missing ones (every release wrote them all: a default would silently build another model)."""
        d = dict(d)
        version = d.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"model config version {version!r} is not {CONFIG_VERSION} (this masksc); the model "
                             "was saved by another masksc version — use that version or retrain.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown MaskSCConfig fields {sorted(unknown)}; the model was saved by another "
                             "masksc version — use that version or retrain.")
        missing = [name for name in names if name not in d]
        if missing:
            raise ValueError(f"the model config lacks {missing}; it was edited — restore it from a copy or retrain.")
        for key in ("grid_shape", "betas"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Fixed sin-cos embedding of 1-D positions: float64 [len(positions), dim]; ValueError unless
    dim is even (a sin and a cos per frequency)."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even for a sin-cos embedding (a sin and a cos per frequency).")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding (half the channels encode the row, half the column):
    float64 [rows*cols, dim], positions row-major; ValueError unless dim is a multiple of 4."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4 for a 2-D sin-cos embedding (half the channels per "
                         "axis, a sin and a cos per frequency).")
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, r), sincos_1d(dim // 2, c)], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention whose core is ``masksc.ops.attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor):
        b, l, d = x.shape
        return self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]; key_padding_mask bool [B, L] (True = ignore key) -> [B, L, D]."""
        q, k, v = self._qkv(x)
        o = ops.attention(q, k, v, key_padding_mask)
        return self.proj(o.transpose(1, 2).reshape(x.shape))

    def probs(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities [B, H, L, L] (for plots only; eager math)."""
        q, k, _ = self._qkv(x)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


def csr_to_dense(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Densify a CSR batch: -> [B, n_cols] float32 (one batch only, never a whole dataset)."""
    n_rows = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow[1:] - crow[:-1])
    out = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=val.device)
    out.index_put_((rows, col), val.float(), accumulate=True)
    return out


class MaskSC(nn.Module):
    """The mask-sc encoder/decoder. See the module docstring and ``MaskSCConfig``."""

    def __init__(self, cfg: MaskSCConfig):
        super().__init__()
        self.cfg = cfg
        d, dd, pp, n_tok = cfg.embed_dim, cfg.decoder_dim, cfg.patch * cfg.patch, cfg.n_patches
        self.patch_weight = nn.Parameter(torch.empty(d, pp))
        self.patch_bias = nn.Parameter(torch.zeros(d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        self.decoder_blocks = nn.ModuleList(Block(dd, cfg.decoder_heads, cfg.mlp_ratio)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd)
        self.head = nn.Linear(dd, cfg.out_dim)

        gp, sp_ = cfg.grid_shape[0] // cfg.patch, cfg.grid_shape[1] // cfg.patch
        if cfg.ime:
            pos, dpos = sincos_2d(d, gp, sp_), sincos_2d(dd, gp, sp_)
        else:
            pos, dpos = sincos_1d(d, np.arange(n_tok)), sincos_1d(dd, np.arange(n_tok))
        self.register_buffer("pos_embed", torch.from_numpy(pos).float()[None], persistent=False)
        self.register_buffer("decoder_pos_embed", torch.from_numpy(dpos).float()[None], persistent=False)
        cols = token_columns(cfg.grid_shape, cfg.patch, cfg.ime)
        self.register_buffer("token_cols", torch.from_numpy(cols), persistent=False)
        if not cfg.ime:
            # Send grid position cols[t, o] to the position of element o of 2-D patch t, so that
            # ops.patch_embed produces the 1-D gene-sequence tokens.
            cols2d = token_columns(cfg.grid_shape, cfg.patch, True)
            remap = np.empty(cfg.n_genes, dtype=np.int64)
            remap[cols.reshape(-1)] = cols2d.reshape(-1)
            self.register_buffer("col_remap", torch.from_numpy(remap), persistent=False)
        # Which grid positions are padding (set from the GridLayout; saved with the weights).
        self.register_buffer("grid_padding", torch.zeros(cfg.n_genes, dtype=torch.bool))
        self.targets = FragmentTargets(cfg.grid_shape, cfg.patch, cfg.target_fragment, cfg.ime) if cfg.med else None
        self.teacher: ContrastiveSC | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_weight)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- setup -------------------------------------------------------------------------
    def set_padding(self, is_padding: np.ndarray | torch.Tensor) -> None:
        """Mark grid padding positions: bool [g*s] (GridLayout.is_padding)."""
        is_padding = torch.as_tensor(np.asarray(is_padding), dtype=torch.bool)
        if is_padding.shape != (self.cfg.n_genes,):
            raise ValueError(f"is_padding has shape {tuple(is_padding.shape)}, expected ({self.cfg.n_genes},) for "
                             f"grid {self.cfg.grid_shape}; pass GridLayout.is_padding of the same grid.")
        self.grid_padding.copy_(is_padding.to(self.grid_padding.device))

    def set_teacher(self, teacher: ContrastiveSC | None) -> None:
        """Attach the frozen contrastive-sc teacher (MED on) whose input is the g*s grid vector."""
        if teacher is None:
            if self.cfg.med:
                raise ValueError("MED is on (cfg.med=True) and needs a teacher; pass a trained ContrastiveSC "
                                 "or build the model with med=False.")
            self.teacher = None
            return
        if teacher.cfg.n_input != self.cfg.n_genes or teacher.out_dim != self.cfg.target_dim:
            raise ValueError(f"teacher maps {teacher.cfg.n_input} -> {teacher.out_dim} but the model needs "
                             f"{self.cfg.n_genes} grid genes -> target_dim {self.cfg.target_dim}; train the "
                             "teacher on the model's grid or set target_dim.")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.to(self.patch_weight.device)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    @property
    def pad_tokens(self) -> torch.Tensor:
        """bool [G]: tokens whose genes are all grid padding (never in the loss or the pooled embedding)."""
        return self.grid_padding[self.token_cols].all(dim=1)

    # ---- pieces ------------------------------------------------------------------------
    def tokenize(self, batch) -> torch.Tensor:
        """CSR batch -> patch tokens + positions [B, G, D] (through ops.patch_embed)."""
        col = batch.col_indices
        if not self.cfg.ime:
            # checked before the remap, as patch_embed checks after it (on the CPU, where it costs no device
            # sync): the remap would raise an IndexError past the grid and wrap a negative index silently
            if col.device.type == "cpu":
                check_csr(batch.crow_indices, col, self.cfg.n_genes)
            col = self.col_remap[col]
        tok = ops.patch_embed(batch.crow_indices, col, batch.values.float(), self.patch_weight, self.patch_bias,
                              tuple(self.cfg.grid_shape), self.cfg.patch)
        return tok + self.pos_embed

    def encode(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor, n_blocks: int | None = None
               ) -> torch.Tensor:
        """tokens [B, L, D] (positions added), key_padding_mask bool [B, L] -> [B, 1+L, D] after
        the final LayerNorm; index 0 is the global token. ``n_blocks``: run only the first
        ``n_blocks`` encoder blocks (default: all ``cfg.depth``)."""
        x, _ = self._through_blocks(tokens, key_padding_mask, self.cfg.depth if n_blocks is None else n_blocks)
        return self.norm(x)

    def _through_blocks(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor, n_blocks: int):
        """The global token prepended and the first ``n_blocks`` encoder blocks run, no final
        LayerNorm: -> (x [B, 1+L, D], the key padding mask [B, 1+L] they used)."""
        if not 0 <= n_blocks <= self.cfg.depth:
            raise ValueError(f"n_blocks={n_blocks} but the encoder has {self.cfg.depth} blocks; "
                             f"pass 0..{self.cfg.depth}.")
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        kpm = F.pad(key_padding_mask, (1, 0), value=False)
        for blk in self.blocks[:n_blocks]:
            x = blk(x, kpm)
        return x, kpm

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+U, D] -> predictions [B, G, out_dim] for every token position."""
        x = self.decoder_embed(latent)
        full = ops.unmask(x[:, 1:], self.mask_token.to(x.dtype), ids_keep, self.cfg.n_patches)
        full = full + self.decoder_pos_embed
        x = torch.cat([x[:, :1], full], dim=1)
        kpm = F.pad(self.pad_tokens.expand(x.shape[0], -1), (1, 0), value=False)
        for blk in self.decoder_blocks:
            x = blk(x, kpm)
        return self.head(self.decoder_norm(x))[:, 1:]

    def compute_targets(self, batch) -> torch.Tensor:
        """Regression targets for every token: [B, G, out_dim] float32."""
        dense = csr_to_dense(batch.crow_indices, batch.col_indices, batch.values, self.cfg.n_genes)
        if self.cfg.med:
            return self.teacher_targets(dense)
        return self.patch_values(dense, standardise=self.cfg.norm_pix)

    def teacher_targets(self, dense: torch.Tensor) -> torch.Tensor:
        """MED targets: the frozen teacher on each token's fragment, scaled by ``target_scale``
        (default sqrt(target_dim)). dense [B, g*s] float32 -> [B, G, target_dim] float32."""
        if self.teacher is None:
            raise RuntimeError("MED is on but no teacher is set; call model.set_teacher(teacher) first.")
        scale = self.cfg.target_scale or math.sqrt(self.cfg.target_dim)
        return self.targets(self.teacher, dense) * scale

    def patch_values(self, dense: torch.Tensor, standardise: bool) -> torch.Tensor:
        """MED-off targets: each token's P*P values, optionally standardised within the token.
        dense [B, g*s] float32 -> [B, G, P*P] float32."""
        vals = dense[:, self.token_cols]
        if standardise:
            vals = (vals - vals.mean(-1, keepdim=True)) / (vals.var(-1, keepdim=True) + 1e-6).sqrt()
        return vals

    @staticmethod
    def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Mean over tokens with mask & ~pad of the per-token MSE (mean over features).
        pred/target [B, G, F]; mask bool [B, G] (True = masked); pad bool [G]. Scalar."""
        per_token = ((pred.float() - target.float()) ** 2).mean(-1)
        weight = (mask & ~pad).float()
        return (per_token * weight).sum() / weight.sum().clamp(min=1.0)

    # ---- public API --------------------------------------------------------------------
    def training_loss(self, batch, seed: int) -> torch.Tensor:
        """Masked-prediction loss of a CSR batch (masking drawn from ``seed``): scalar tensor."""
        tokens = self.tokenize(batch)
        kept, ids_keep, _, mask = ops.random_masking(tokens, self.cfg.n_keep, seed)
        pad = self.pad_tokens
        latent = self.encode(kept, pad[ids_keep])
        pred = self.decode(latent, ids_keep)
        with torch.no_grad(), torch.autocast(device_type=pred.device.type, enabled=False):
            target = self.compute_targets(batch)  # targets in float32 even under bf16 autocast
        return self.masked_mse(pred, target, mask, pad)

    def forward(self, batch, seed: int) -> torch.Tensor:
        """Same as ``training_loss`` (so a DDP wrapper's forward runs it)."""
        return self.training_loss(batch, seed)

    def _encode_all(self, batch) -> torch.Tensor:
        tokens = self.tokenize(batch)
        return self.encode(tokens, self.pad_tokens.expand(tokens.shape[0], -1))

    def embed(self, batch) -> torch.Tensor:
        """Cell embeddings [B, cfg.embedding_dim] float32 from the encoder on all tokens (no
        masking), by ``cfg.pool``: ``mean`` of the non-padding patch tokens after the final
        LayerNorm, the global token (``cls``), or ``target``: the decoder's prediction of the
        teacher feature at every token, nothing masked, averaged over the non-padding tokens
        (a cell's estimate of its own sequence-level target, in the teacher's space)."""
        x = self._encode_all(batch)
        if self.cfg.pool == "cls":
            return x[:, 0].float()
        if self.cfg.pool == "target":
            all_ids = torch.arange(self.cfg.n_patches, device=x.device).expand(x.shape[0], -1)
            tokens = self.decode(x, all_ids).float()
        else:
            tokens = x[:, 1:].float()
        return self.mean_over_patches(tokens)

    def mean_over_patches(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of per-patch vectors over the patches that are not padding: tokens [B, L, F] ->
        [B, F] float32. ``padding`` bool [L] or [B, L], True = padding; default the model's
        padding patches (L = G). For a masked view's kept tokens pass ``pad_tokens[ids_keep]``."""
        pad = self.pad_tokens if padding is None else padding
        keep = (~pad).float().expand(tokens.shape[0], -1)
        return (tokens.float() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)

    def last_attention(self, batch) -> torch.Tensor:
        """Attention probabilities of the last encoder block on all tokens: [B, heads, 1+G, 1+G]
        (index 0 = global token, then patches row-major)."""
        tokens = self.tokenize(batch)
        x, kpm = self._through_blocks(tokens, self.pad_tokens.expand(tokens.shape[0], -1), self.cfg.depth - 1)
        last = self.blocks[-1]
        return last.attn.probs(last.norm1(x), kpm)
