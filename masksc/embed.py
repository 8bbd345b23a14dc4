"""Cell embeddings from a trained model, batch by batch (the dataset is never densified)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from masksc.checks import check_flags
from masksc.progress import progress_bar


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, device: str | torch.device | None = None):
    """``model`` (a DDP wrapper's ``module``) moved to ``device`` (None: where its weights are) in
    eval mode without gradients; yields (the module, its torch.device) and restores the
    module's train/eval mode afterwards."""
    core = getattr(model, "module", model)
    device = torch.device(device) if device is not None else next(core.parameters()).device
    was_training = core.training
    core.to(device).eval()
    try:
        with torch.no_grad():
            yield core, device
    finally:
        core.train(was_training)


def embed_matrix(model: torch.nn.Module, X_grid_csr, batch_size: int = 1024,
                 device: str | torch.device | None = None, progress: bool = True,
                 amp: bool = False) -> np.ndarray:
    """Embed every cell of ``X_grid_csr`` (scipy CSR [n, g*s] in grid order) in row order.

    Runs ``model.embed`` (encoder on all patches, no masking) in eval mode without gradients.
    ``amp`` uses bf16 autocast on CUDA. Returns float32 [n, cfg.embedding_dim].
    """
    from masksc.data import CellBatches
    from masksc.models.targets import check_grid_columns

    check_flags(progress=progress, amp=amp)
    check_grid_columns(X_grid_csr, getattr(model, "module", model).cfg.grid_shape)
    with evaluating(model, device) as (core, device):
        out = np.empty((X_grid_csr.shape[0], core.cfg.embedding_dim), dtype=np.float32)
        batches = CellBatches(X_grid_csr, batch_size=batch_size, shuffle=False)
        for batch in progress_bar(batches, total=len(batches), desc="embed", disable=not progress, leave=False):
            batch = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=bool(amp) and device.type == "cuda"):  # torch takes no np.bool_
                z = core.embed(batch)
            out[batch.cell_index.cpu().numpy()] = z.float().cpu().numpy()
    return out
