"""Outlier tokens: which tokens carry massive activations, where, and which prefix would absorb them (PrefixQuant).

Reference: Chen et al., "PrefixQuant: Eliminating Outliers by Prefixed Tokens for Large Language Models
Quantization", 2024, arXiv 2410.05265. For every decoder layer and calibration sample, each token's largest
absolute activation ``M_i = max |x_i|`` is taken at the down_proj input (after any online rotation, as the weight
sees it) and in the residual stream (the layer's output); token ``i`` is an *outlier* when ``M_i / median(M) > eta``
(median over the sample's tokens; ``eta = 64`` by default).

:func:`select_prefix` turns the statistics into PrefixQuant's prefix: its length is the largest (over layers) mean
number of outlier tokens per sample, rounded up; its tokens are the most frequent outlier token ids outside position
0, followed by BOS (never a second BOS: a repeated BOS is itself an outlier).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..data import prepend_tokens
from ..models.arch import ArchSpec, decoder_layers, get_module
from ..surgery.sequential import capture_inputs
from .plotting import pyplot

SITES = ("down_proj_input", "residual")


@torch.no_grad()
def token_maxima(model: nn.Module, spec: ArchSpec, batches: Tensor) -> dict[str, Tensor]:
    """Per site, ``max |x|`` of every token: ``[layers, samples, seq_len]`` float32, from batches ``[n, L]``."""
    layers = decoder_layers(model, spec)
    down: dict[int, list[Tensor]] = {i: [] for i in range(len(layers))}
    modules = {str(i): get_module(layer, spec.down) for i, layer in enumerate(layers)}
    residual = []
    with capture_inputs(modules, lambda name, x: down[int(name)].append(x.abs().amax(-1).float())):
        for row in batches:
            out = model(row.unsqueeze(0), use_cache=False, output_hidden_states=True)
            residual.append(torch.stack([h[0].abs().amax(-1).float() for h in out.hidden_states[1:]]))
    return {"down_proj_input": torch.stack([torch.cat(down[i]) for i in range(len(layers))]),
            "residual": torch.stack(residual, dim=1)}


@dataclass
class SiteStats:
    """One site of one layer: the largest max/median ratio, outliers per sample, and which tokens they were."""

    layer: int
    max_ratio: float
    median_ratio_of_top: float
    outliers_per_sample: float
    token_ids: dict[int, int] = field(default_factory=dict)  # outlier token id -> count, position 0 excluded
    positions: dict[int, int] = field(default_factory=dict)  # outlier position -> count (position 0 included)


def site_stats(maxima: Tensor, batches: Tensor, eta: float) -> list[SiteStats]:
    """Per layer statistics of ``maxima`` ``[layers, n, L]`` for token batches ``[n, L]``."""
    ratio = maxima / maxima.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    stats = []
    for layer, r in enumerate(ratio):
        outliers = r > eta
        ids = Counter(batches[:, 1:][outliers[:, 1:]].tolist())
        positions = Counter(outliers.nonzero()[:, 1].tolist())
        stats.append(SiteStats(layer=layer, max_ratio=float(r.max()), median_ratio_of_top=float(r.amax(-1).median()),
                               outliers_per_sample=float(outliers.sum(-1).float().mean()),
                               token_ids=dict(ids.most_common()), positions=dict(sorted(positions.items()))))
    return stats


@dataclass
class OutlierReport:
    """Statistics per site and layer, the threshold used, and the token batches' shape."""

    eta: float
    samples: int
    seq_len: int
    sites: dict[str, list[SiteStats]]

    def largest_ratio(self, site: str = "down_proj_input") -> float:
        """The largest token max / median ratio over every layer at ``site``."""
        return max(s.max_ratio for s in self.sites[site])

    def as_dict(self) -> dict:
        return {"eta": self.eta, "samples": self.samples, "seq_len": self.seq_len,
                "largest_ratio": {site: self.largest_ratio(site) for site in self.sites},
                "sites": {site: [asdict(s) for s in stats] for site, stats in self.sites.items()}}


def analyze(model: nn.Module, spec: ArchSpec, batches: Tensor, eta: float = 64.0,
            prefix: list[int] | None = None) -> OutlierReport:
    """Outlier-token statistics of ``model`` on calibration batches ``[n, L]``.

    With a ``prefix``, every sample runs after those tokens and the statistics cover the sample's own tokens only
    (the prefix's keys and values stay in full precision, so its activations are never quantized).
    """
    if eta <= 1:
        raise ValueError(f"the outlier threshold eta must be > 1, got {eta}")
    skip = len(prefix or [])
    batches_in = prepend_tokens(prefix, batches) if skip else batches
    maxima = {site: m[..., skip:] for site, m in token_maxima(model, spec, batches_in).items()}
    return OutlierReport(eta=eta, samples=batches.shape[0], seq_len=batches.shape[1],
                         sites={site: site_stats(maxima[site], batches, eta) for site in SITES})


def select_prefix(report: OutlierReport, bos_token_id: int | None, site: str = "down_proj_input") -> list[int]:
    """PrefixQuant's prefix: up to ``o`` most frequent outlier token ids (position 0 excluded), then BOS.

    ``o`` is the largest mean number of outlier tokens per sample over the layers, rounded up. Ids come from the
    outliers actually seen, so a model whose only outlier is position 0 gets the prefix ``[BOS]``; BOS is never
    repeated.
    """
    stats = report.sites[site]
    length = math.ceil(max(s.outliers_per_sample for s in stats) - 1e-9)
    counts: Counter = Counter()
    for s in stats:
        counts.update(s.token_ids)
    ids = [tok for tok, _ in counts.most_common() if tok != bos_token_id][:length]
    return ids if bos_token_id is None else [*ids, bos_token_id]


def plot_ratios(reports: dict[str, OutlierReport], path, site: str = "down_proj_input") -> bool:
    """A PNG of the largest token max / median ratio per layer, one line per report; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, report in reports.items():
        stats = report.sites[site]
        ax.plot([s.layer for s in stats], [s.max_ratio for s in stats], marker="o", ms=3, label=label)
    eta = next(iter(reports.values())).eta
    ax.axhline(eta, color="grey", ls="--", lw=1, label=f"eta = {eta:g}")
    ax.set(yscale="log", xlabel="decoder layer", ylabel="max token |x| / median", title=f"Outlier tokens ({site})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
