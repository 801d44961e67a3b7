"""Look inside adapters, after section 7 of the LoRA paper (Hu et al. 2021).

Per layer of one adapter: the singular values of its delta, and three effective ranks:
- `rank_90`, `rank_99`: the fewest singular values holding 90% / 99% of the energy (sum of s^2, i.e. of the squared
  Frobenius norm). Note resize's `keep` is a share of the norm itself, sqrt(energy): keep 0.95 is energy 0.9025.
- `effective_rank`: the entropy-based effective rank of Roy & Vetterli (2007), exp(H(p)) with p_k = s_k / sum(s);
  a real number between 1 and the rank.

For two adapters on the same layers: the normalised subspace similarity of the paper's Figure 3,
phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), where U1_i holds the top-i right-singular vectors of adapter 1's down
matrix A (its row space; a conv's A is flattened to [r, in*kh*kw]). phi is 1 when one subspace contains the other
and, for independent random subspaces of R^d, has expectation max(i, j) / d.

LoHa, LoKr and LoCon's Tucker form have no A: their spectrum is that of the formed delta, and their subspace the
delta's top right-singular vectors (at most MAX_BASIS, of its numerical rank: a Hadamard or Kronecker product may be
full rank). A DoRA magnitude is left out of both: they describe the update's direction, delta.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.atomic import write_json_atomic
from trainer.formats import AdapterFormatError
from trainer.lora_state import Adapter, delta_shape

from .lowrank import layer_svd

MAX_HEATMAPS = 4
MAX_BASIS = 64  # right-singular vectors kept of a formed delta: a LoRA's A has rank rows, usually 4 to 64


def energy_rank(s: torch.Tensor, share: float) -> int:
    """Fewest singular values whose energy (sum of s^2) reaches `share` of the total."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    reached = (energy.cumsum(0) / total >= share - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(s)


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the singular values normalised to sum 1."""
    s = s.double()
    s = s[s > 0]
    if len(s) == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum(adapter: Adapter) -> dict[str, dict]:
    """Per layer: rank, singular values of the delta, rank_90, rank_99, effective_rank, Frobenius norm."""
    out = {}
    for name, layer in adapter.layers.items():
        s = layer_svd(layer)[1]
        out[name] = {"rank": layer.rank, "singular_values": [float(x) for x in s],
                     "rank_90": energy_rank(s, 0.90), "rank_99": energy_rank(s, 0.99),
                     "effective_rank": effective_rank(s), "norm": float(s.square().sum().sqrt())}
    return out


def right_singular_vectors(down: torch.Tensor) -> torch.Tensor:
    """Columns = right-singular vectors of A ([r, in] or a flattened conv), most important first: [in, r]."""
    return torch.linalg.svd(down.flatten(1).double(), full_matrices=False)[2].T


def input_basis(layer) -> torch.Tensor:
    """[in*kh*kw, k]: the input directions the layer's update reads, most important first: a LoRA's A's
    right-singular vectors (the paper's choice), else the delta's (its numerical rank, at most MAX_BASIS)."""
    if layer.kind == "lora" and layer.mid is None:
        return right_singular_vectors(layer.down)
    s, vh = torch.linalg.svd(layer.delta(torch.float64).flatten(1), full_matrices=False)[1:]
    k = int((s > s[0] * 1e-10).sum()) if len(s) and s[0] > 0 else 1
    return vh[:max(1, min(k, MAX_BASIS))].T


def input_size(layer) -> int:
    """in * kh * kw of the adapted weight."""
    if layer.kind == "lora" and layer.mid is None:
        return layer.down[0].numel()
    return torch.Size(delta_shape(layer)[1:]).numel()


def subspace_similarity(down_1: torch.Tensor, down_2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||U1_i^T U2_j||_F^2 / min(i, j) for i <= r1, j <= r2 (the paper's Figure 3)."""
    return basis_similarity(right_singular_vectors(down_1), right_singular_vectors(down_2))


def basis_similarity(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """phi of two orthonormal bases (columns, most important first)."""
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"subspace similarity: input sizes differ ({u1.shape[0]} vs {u2.shape[0]})")
    overlap = (u1.T @ u2).square().cumsum(0).cumsum(1)  # [i, j] = ||U1_i^T U2_j||_F^2
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap / torch.minimum(i, j)


def analyze(adapter_a: Adapter, out_dir: str | Path, adapter_b: Adapter | None = None,
            layers: list[str] | None = None, labels: tuple[str, str] = ("A", "B"),
            sources: tuple[str, str] | None = None) -> dict:
    """Write `analysis.json` (+ one `similarity_<layer>.png` per chosen layer with two adapters) into out_dir.

    `layers` picks the heatmap layers (default: up to 4 of the common to_q/to_v layers, evenly spaced, as the paper
    looked at Wq and Wv). `sources` (default: the labels) name the adapters, e.g. by file, in error messages.
    Returns the JSON's content.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"adapters": {labels[0]: _summary(adapter_a)}}
    if adapter_b is not None:
        result["adapters"][labels[1]] = _summary(adapter_b)
        result["similarity"] = _similarities(adapter_a, adapter_b, out_dir, layers, labels, sources or labels)
    write_json_atomic(out_dir / "analysis.json", result)
    return result


def _summary(adapter: Adapter) -> dict:
    layers = spectrum(adapter)
    n = max(len(layers), 1)
    return {"layers": layers,
            "mean_effective_rank": sum(v["effective_rank"] for v in layers.values()) / n,
            "mean_rank_90": sum(v["rank_90"] for v in layers.values()) / n,
            "mean_rank_99": sum(v["rank_99"] for v in layers.values()) / n}


def _similarities(a: Adapter, b: Adapter, out_dir: Path, layers: list[str] | None, labels, sources) -> dict:
    common = [name for name in a.layers if name in b.layers]
    if not common:
        raise AdapterFormatError(f"{sources[0]} and {sources[1]} share no layers, so their subspaces cannot be "
                                 f"compared; analyze two adapters trained on the same base model")
    _check_input_sizes(a, b, common, sources)
    unknown = [name for name in layers or [] if name not in common]
    if unknown:
        raise ValueError(f"layers not in both adapters: {', '.join(unknown)}")
    chosen = layers or default_layers(common)
    out = {"per_layer": {}, "heatmaps": {}}
    for name in common:
        phi = basis_similarity(input_basis(a.layers[name]), input_basis(b.layers[name]))
        out["per_layer"][name] = {"phi_1_1": float(phi[0, 0]), "mean": float(phi.mean()),
                                  "input_size": input_size(a.layers[name])}
        if name in chosen:
            png = out_dir / f"similarity_{_safe(name)}.png"
            from .heatmap import save_heatmap
            save_heatmap(phi, png, title=name, row_label=f"i ({labels[0]})", col_label=f"j ({labels[1]})")
            out["heatmaps"][name] = {"png": png.name, "phi": phi.tolist()}
    return out


def _check_input_sizes(a: Adapter, b: Adapter, common: list[str], sources) -> None:
    for name in common:
        size_a, size_b = input_size(a.layers[name]), input_size(b.layers[name])
        if size_a != size_b:
            raise AdapterFormatError(f"layer {name}: {sources[0]} has input size {size_a} but {sources[1]} has "
                                     f"{size_b}; they were trained for different base models, so their subspaces "
                                     f"cannot be compared")


def default_layers(common: list[str], n: int = MAX_HEATMAPS) -> list[str]:
    preferred = [name for name in common if name.endswith(("_to_q", "_to_v", "_q_proj", "_v_proj"))] or common
    if len(preferred) <= n:
        return preferred
    step = (len(preferred) - 1) / (n - 1)
    return [preferred[round(k * step)] for k in range(n)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:150]
