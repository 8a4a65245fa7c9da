"""AlphaEdit: Null-Space Constrained Knowledge Editing (Fang et al., 2025, ICLR).

AlphaEdit keeps MEMIT's targets and their spreading over layers, and changes how a layer's
update is solved: the update is projected onto the null space of the keys of knowledge to
preserve, so that (to the precision of the projection) W' k0 = W k0 for those keys, and the
preservation term drops out of the objective. With P the projection onto the eigenvectors of
C = E[k0 k0^T] whose eigenvalues are below ``nullspace_threshold``, K the new keys, R the
layer's share of the residual and K_p the keys of earlier edits still applied (eq. 14)::

    Delta = R K^T P (K_p K_p^T P + K K^T P + alpha I)^-1

computed here as Delta^T = (P (K K^T + K_p K_p^T) + alpha I)^-1 P K R^T, stored as the factors
R and ((...)^-1 P K)^T. Keys of earlier edits are remembered by the editor object for as long as
those edits stay applied, which is what sequential editing needs; edits that were reverted (as
in single-edit evaluation) stop counting.
"""

from __future__ import annotations

import torch

from ..base import Edit, register_editor
from .config import AlphaEditConfig
from .editor import MEMIT


@register_editor("alphaedit", AlphaEditConfig)
class AlphaEdit(MEMIT):
    """MEMIT's targets, with each layer's update projected onto the preserved keys' null space."""

    def __init__(self) -> None:
        super().__init__()
        self._projections: dict[tuple, torch.Tensor] = {}
        self._history: dict[tuple[int, str], list[tuple[Edit, torch.Tensor]]] = {}

    def projection(self, model, name: str, moment: torch.Tensor | None, threshold: float) -> torch.Tensor:
        if moment is None:
            raise ValueError("alphaedit needs key statistics for its null-space projection; keep mom2_adjustment on")
        key = (self.base_fingerprint(model), name, threshold, moment.shape[0], float(moment.trace()))
        if key not in self._projections:
            eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())
            null = eigenvectors[:, eigenvalues < threshold]
            self._projections[key] = null @ null.T
        return self._projections[key]

    def solve(self, model, name, keys, residual, moment, config: AlphaEditConfig):
        projection = self.projection(model, name, moment, config.nullspace_threshold).to(keys.device)
        gram = keys.T @ keys
        for edit, earlier in self._history.get((id(model), name), []):
            if edit.is_applied:
                gram = gram + earlier.to(gram.device)
        system = projection @ gram + config.l2 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        right = torch.linalg.solve(system, projection @ keys.T).T  # [n, d_in]
        return residual.T, right

    def remember(self, model, edit: Edit, layer_keys: dict[str, torch.Tensor]) -> None:
        for name, keys in layer_keys.items():
            history = self._history.setdefault((id(model), name), [])
            history[:] = [(e, g) for e, g in history if e.is_applied]
            history.append((edit, (keys.T @ keys).cpu()))
        edit.info["nullspace_dims"] = {
            name: int(round(float(p.trace()))) for (fp, name, *_), p in self._projections.items() if name in layer_keys
        }
