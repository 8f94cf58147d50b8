"""Scaling laws over a size ladder: L(C) = a * C^-b + c for diffusion and AR, side by side.

Inputs are the rungs' training-loss curves (nats per token, the same tokens for both
objectives: positions 1..T-1 of each block) against compute C = 6 * N * D (N: the
parameters that cost compute per token, D: tokens trained; Kaplan et al. 2020).

- ``curve_points``: a rung's curve cut into log-spaced compute bins; each point is the
  bin's mean loss with the standard error of that mean (the spread of the step losses in
  the bin, each step a fresh batch and fresh masking noise).
- ``frontier``: on a log grid of compute, the lowest loss any rung reaches there (the
  compute-efficient frontier of Kaplan et al.; every rung trains to the same budget).
- ``fit_power_law``: ``scipy.optimize.curve_fit`` of a * C^-b + c to the frontier, weighted
  by the points' errors; parameter uncertainties from the covariance (scaled by the reduced
  chi-square: the bin errors are not trusted in absolute terms).
- ``compute_multiplier``: the compute the DLM needs to reach the AR loss, C_dlm / C_ar
  (SMDM, Nie et al. 2024: about 16x). From the fits at a reference compute (extrapolating
  the DLM's law) with a parametric-bootstrap interval, and without any fit where the curves
  overlap: the AR compute at which the AR frontier reached the DLM's best loss.
- ``fit_loss_surface`` / ``compute_optimal``: Chinchilla's parametric form
  L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022, approach 3) over all points of all
  rungs, then N_opt(C) = G (C/6)^(beta/(alpha+beta)); interval by parametric bootstrap.
- ``plot``: both fits with their points (matplotlib, Agg backend), a PNG.

Small ladders give wide intervals: they are reported as they come out, never narrowed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from dlm_factory.dlm.errors import FactoryError


@dataclass
class Point:
    compute: float  # FLOPs
    loss: float  # nats per token
    stderr: float
    params: int = 0  # N of the rung the point comes from
    tokens: float = 0.0  # D
    rung: str = ""


@dataclass
class PowerLaw:
    """L(C) = a * C^-b + c, stored as A * (C / c0)^-b + c (a = A * c0^b) for numerical sanity."""

    A: float
    b: float
    c: float
    c0: float
    cov: list[list[float]]  # covariance of (A, b, c)
    points: int
    chi2_per_dof: float

    @property
    def a(self) -> float:
        return self.A * self.c0**self.b

    def stderr(self) -> dict[str, float]:
        """Standard errors of a, b, c (a by the delta method: a = A c0^b)."""
        cov = np.asarray(self.cov)
        sA, sb, sc = np.sqrt(np.clip(np.diag(cov), 0, None))
        grad = np.array([self.c0**self.b, self.A * self.c0**self.b * math.log(self.c0), 0.0])
        sa = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
        return {"a": sa, "b": float(sb), "c": float(sc), "A": float(sA)}

    def __call__(self, compute):
        return self.A * (np.asarray(compute, dtype=float) / self.c0) ** -self.b + self.c

    def compute_for(self, loss: float) -> float:
        """The compute at which the law reaches ``loss`` (inf when it never does: loss <= c)."""
        if loss <= self.c or self.A <= 0 or self.b <= 0:
            return math.inf
        try:
            return self.c0 * (self.A / (loss - self.c)) ** (1 / self.b)
        except OverflowError:  # a nearly flat law: out of any float's range
            return math.inf

    def samples(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Parameter draws (A, b, c) from the fit's normal approximation, [n, 3]."""
        return rng.multivariate_normal([self.A, self.b, self.c], np.asarray(self.cov), size=n,
                                       check_valid="ignore", method="eigh")

    def to_dict(self) -> dict:
        return {"law": "L(C) = a * C^-b + c", "a": self.a, "b": self.b, "c": self.c, "stderr": self.stderr(),
                "reference_compute": self.c0, "A_at_reference": self.A, "points": self.points,
                "chi2_per_dof": self.chi2_per_dof}


def curve_points(curve: list[tuple[int, float]], *, params: int, tokens_per_step: int, bins: int = 12,
                 skip_fraction: float = 0.1, rung: str = "") -> list[Point]:
    """A rung's loss curve [(step, loss)] as log-spaced compute bins (the first ``skip_fraction`` dropped)."""
    if not curve:
        return []
    steps = np.array([s for s, _ in curve], dtype=float)
    losses = np.array([v for _, v in curve], dtype=float)
    keep = steps > skip_fraction * steps.max()
    steps, losses = steps[keep], losses[keep]
    if len(steps) < 2:
        return []
    edges = np.unique(np.round(np.geomspace(steps.min(), steps.max() + 1, bins + 1)))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (steps >= lo) & (steps < hi)
        if sel.sum() < 2:
            continue  # one step has no spread to give its error
        s, v = steps[sel], losses[sel]
        tokens = float(s.mean()) * tokens_per_step
        out.append(Point(compute=6.0 * params * tokens, loss=float(v.mean()),
                         stderr=float(v.std(ddof=1) / math.sqrt(len(v))), params=params, tokens=tokens, rung=rung))
    return out


def frontier(rungs: dict[str, list[Point]], grid: int = 16) -> list[Point]:
    """The lowest loss over the rungs on a log grid of compute (each rung interpolated in log C)."""
    spans = [(p[0].compute, p[-1].compute) for p in rungs.values() if len(p) >= 2]
    if not spans:
        return []
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    out = []
    for c in np.geomspace(lo, hi, grid):
        best = None
        for name, pts in rungs.items():
            if len(pts) < 2 or not pts[0].compute <= c <= pts[-1].compute:
                continue
            x = np.log([p.compute for p in pts])
            loss = float(np.interp(math.log(c), x, [p.loss for p in pts]))
            err = float(np.interp(math.log(c), x, [p.stderr for p in pts]))
            if best is None or loss < best.loss:
                n = pts[0].params
                best = Point(compute=float(c), loss=loss, stderr=err, params=n, tokens=float(c) / (6 * n), rung=name)
        if best is not None:
            out.append(best)
    return out


def fit_power_law(points: list[Point], *, reference: float | None = None) -> PowerLaw:
    """Weighted least squares of L = A (C/c0)^-b + c; FactoryError when there are too few points or no fit."""
    from scipy.optimize import curve_fit

    if len(points) < 4:
        raise FactoryError(f"a power law with an offset needs at least 4 points, got {len(points)}")
    C = np.array([p.compute for p in points])
    L = np.array([p.loss for p in points])
    sigma = np.array([max(p.stderr, 1e-6) for p in points])
    c0 = float(reference or C.max())
    x = C / c0

    def law(x, A, b, c):
        return A * x**-b + c

    c_guess = max(0.0, float(L.min()) - 0.5 * float(L.max() - L.min()) - 1e-3)
    p0 = [max(float(L.min()) - c_guess, 1e-3), 0.3, c_guess]
    bounds = ([0.0, 1e-4, 0.0], [np.inf, 5.0, float(L.min())])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, pcov = curve_fit(law, x, L, p0=p0, sigma=sigma, absolute_sigma=False, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise FactoryError(f"the power-law fit did not converge ({e})") from e
    resid = (L - law(x, *popt)) / sigma
    dof = max(len(points) - 3, 1)
    pcov = np.where(np.isfinite(pcov), pcov, 0.0)
    return PowerLaw(A=float(popt[0]), b=float(popt[1]), c=float(popt[2]), c0=c0, cov=pcov.tolist(),
                    points=len(points), chi2_per_dof=float((resid**2).sum() / dof))


@dataclass
class Multiplier:
    """C_dlm / C_ar at equal loss."""

    reference_compute: float  # the AR compute the comparison is made at
    ar_loss: float  # L_ar(reference)
    value: float  # from the fits (inf: the DLM's law never gets there)
    interval: tuple[float, float]  # 16th-84th percentile of the parametric bootstrap
    unreachable_fraction: float  # bootstrap draws whose DLM law never reaches the AR loss
    observed: float | None = None  # without fits: C_dlm / C_ar where both frontiers reach the same loss
    observed_loss: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compute_multiplier(dlm: PowerLaw, ar: PowerLaw, reference: float, *, dlm_frontier: list[Point] | None = None,
                       ar_frontier: list[Point] | None = None, draws: int = 4000, seed: int = 0) -> Multiplier:
    """The compute the DLM needs to reach the AR loss at ``reference`` AR compute, as a multiple of it."""
    target = float(ar(reference))
    value = dlm.compute_for(target) / reference
    rng = np.random.default_rng(seed)
    d, a = dlm.samples(draws, rng), ar.samples(draws, rng)
    ar_loss = a[:, 0] * (reference / ar.c0) ** -a[:, 1] + a[:, 2]
    gap = ar_loss - d[:, 2]
    ok = (gap > 0) & (d[:, 0] > 0) & (d[:, 1] > 0)
    ratios = np.full(draws, np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        ratios[ok] = dlm.c0 * (d[ok, 0] / gap[ok]) ** (1 / d[ok, 1]) / reference
    ratios[~np.isfinite(ratios)] = np.inf
    lo, hi = (float(np.percentile(ratios, q, method="nearest")) for q in (16, 84))  # inf-safe
    observed = observed_loss = None
    if dlm_frontier and ar_frontier:
        observed_loss = min(p.loss for p in dlm_frontier)
        c_dlm = min(p.compute for p in dlm_frontier if p.loss == observed_loss)
        c_ar = _first_compute_at(ar_frontier, observed_loss)
        observed = c_dlm / c_ar if c_ar else None
    return Multiplier(reference_compute=reference, ar_loss=target, value=value, interval=(lo, hi),
                      unreachable_fraction=float((~ok).mean()), observed=observed, observed_loss=observed_loss)


def _first_compute_at(points: list[Point], loss: float) -> float | None:
    """The compute at which a frontier first gets down to ``loss`` (log-interpolated), None if it never does."""
    for p, q in zip(points[:-1], points[1:], strict=True):
        if p.loss >= loss >= q.loss and p.loss != q.loss:
            f = (p.loss - loss) / (p.loss - q.loss)
            return float(math.exp(math.log(p.compute) + f * (math.log(q.compute) - math.log(p.compute))))
    if points and points[0].loss <= loss:
        return points[0].compute  # already there at the first point: an upper bound on the AR compute
    return None


@dataclass
class LossSurface:
    """L(N, D) = E + A (N/n0)^-alpha + B (D/d0)^-beta (Chinchilla approach 3)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n0: float
    d0: float
    cov: list[list[float]]
    points: int

    def __call__(self, n, d):
        return self.E + self.A * (np.asarray(n) / self.n0) ** -self.alpha + self.B * (np.asarray(d) / self.d0) ** -self.beta

    def optimal_params(self, compute: float, theta=None) -> float:
        E, A, alpha, B, beta = theta if theta is not None else (self.E, self.A, self.alpha, self.B, self.beta)
        k = compute / (6 * self.n0 * self.d0)
        return self.n0 * (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * k ** (beta / (alpha + beta))

    def to_dict(self) -> dict:
        names = ["E", "A", "alpha", "B", "beta"]
        err = np.sqrt(np.clip(np.diag(np.asarray(self.cov)), 0, None))
        return {"law": "L(N, D) = E + A (N/n0)^-alpha + B (D/d0)^-beta", "n0": self.n0, "d0": self.d0,
                **{k: getattr(self, k) for k in names}, "stderr": dict(zip(names, map(float, err), strict=True)),
                "points": self.points}


def fit_loss_surface(points: list[Point]) -> LossSurface:
    """Chinchilla's parametric loss over all points of all rungs (needs at least 2 sizes)."""
    from scipy.optimize import curve_fit

    if len({p.params for p in points}) < 2 or len(points) < 6:
        raise FactoryError("the loss surface needs points of at least 2 sizes (6 points)")
    N = np.array([p.params for p in points], dtype=float)
    D = np.array([p.tokens for p in points], dtype=float)
    L = np.array([p.loss for p in points])
    sigma = np.array([max(p.stderr, 1e-6) for p in points])
    n0, d0 = float(N.max()), float(D.max())

    def law(x, E, A, alpha, B, beta):
        n, d = x
        return E + A * n**-alpha + B * d**-beta

    p0 = [max(float(L.min()) * 0.8, 0.0), 0.2, 0.3, 0.3, 0.3]
    bounds = ([0.0, 0.0, 1e-3, 0.0, 1e-3], [float(L.min()), np.inf, 3.0, np.inf, 3.0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, pcov = curve_fit(law, (N / n0, D / d0), L, p0=p0, sigma=sigma, bounds=bounds, maxfev=40000)
    except (RuntimeError, ValueError) as e:
        raise FactoryError(f"the loss-surface fit did not converge ({e})") from e
    pcov = np.where(np.isfinite(pcov), pcov, 0.0)
    return LossSurface(*map(float, popt), n0=n0, d0=d0, cov=pcov.tolist(), points=len(points))


def compute_optimal(surface: LossSurface, compute: float, *, ladder: tuple[float, float] | None = None,
                    draws: int = 4000, seed: int = 0) -> dict:
    """N_opt, D_opt and the predicted loss at ``compute``, with a 16-84% parametric-bootstrap interval of N_opt.

    ``trusted`` is False (with the reason) when the answer is not identifiable from the ladder:
    an exponent at its bound, N_opt more than 10x outside the ladder's sizes (``ladder``: the
    smallest and largest N), or an interval wider than 100x.
    """
    n = surface.optimal_params(compute)
    rng = np.random.default_rng(seed)
    theta = rng.multivariate_normal([surface.E, surface.A, surface.alpha, surface.B, surface.beta],
                                    np.asarray(surface.cov), size=draws, check_valid="ignore", method="eigh")
    ok = (theta[:, 1] > 0) & (theta[:, 2] > 0) & (theta[:, 3] > 0) & (theta[:, 4] > 0)
    ns = np.array([surface.optimal_params(compute, t) for t in theta[ok]]) if ok.any() else np.array([n])
    lo, hi = float(np.percentile(ns, 16)), float(np.percentile(ns, 84))
    why = []
    if min(surface.alpha, surface.beta) < 2e-3 or max(surface.alpha, surface.beta) > 2.99:
        why.append("an exponent sits at its bound")
    if ladder is not None and not ladder[0] / 10 <= n <= ladder[1] * 10:
        why.append(f"N_opt is more than 10x outside the ladder ({ladder[0]:.3g}-{ladder[1]:.3g})")
    if not (lo > 0 and hi / lo < 100):
        why.append("the 68% interval spans more than 100x")
    return {"compute": compute, "params": float(n), "tokens": float(compute / (6 * n)) if n > 0 else math.inf,
            "loss": float(surface(n, compute / (6 * n))) if n > 0 else math.nan,
            "params_interval": (lo, hi), "valid_draws": float(ok.mean()), "trusted": not why,
            "why_not": "; ".join(why)}


@dataclass
class ObjectiveFit:
    """Everything fitted for one objective."""

    objective: str
    rungs: dict[str, list[Point]]
    frontier: list[Point]
    law: PowerLaw | None
    surface: LossSurface | None = None
    optimal: dict | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"objective": self.objective, "law": self.law.to_dict() if self.law else None,
                "surface": self.surface.to_dict() if self.surface else None, "compute_optimal": self.optimal,
                "frontier": [asdict(p) for p in self.frontier],
                "points": {k: [asdict(p) for p in v] for k, v in self.rungs.items()}, "errors": self.errors}


def fit_objective(objective: str, rungs: dict[str, list[Point]], *, target_compute: float,
                  reference: float | None = None) -> ObjectiveFit:
    """The frontier, its power law and the compute-optimal size for one objective (failures recorded, not raised)."""
    front = frontier(rungs)
    out = ObjectiveFit(objective, rungs, front, None)
    try:
        out.law = fit_power_law(front, reference=reference)
    except FactoryError as e:
        out.errors.append(f"power law: {e}")
    try:
        out.surface = fit_loss_surface([p for pts in rungs.values() for p in pts])
        sizes = [pts[0].params for pts in rungs.values() if pts]
        out.optimal = compute_optimal(out.surface, target_compute, ladder=(min(sizes), max(sizes)))
    except FactoryError as e:
        out.errors.append(f"loss surface: {e}")
    return out


def plot(fits: list[ObjectiveFit], path, *, title: str = "", multiplier: Multiplier | None = None) -> None:
    """Loss against compute: each objective's rung points, frontier and fitted law, on log-x axes (a PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    colors = {"diffusion": "tab:blue", "ar": "tab:orange"}
    markers = "osD^v<>p*h"
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for f in fits:
        color = colors.get(f.objective, "tab:gray")
        for i, (name, pts) in enumerate(f.rungs.items()):
            ax.errorbar([p.compute for p in pts], [p.loss for p in pts], yerr=[p.stderr for p in pts],
                        fmt=markers[i % len(markers)], ms=4, color=color, alpha=0.45, lw=0.8,
                        label=f"{f.objective} {name}")
        if f.law is not None and f.frontier:
            cs = np.geomspace(f.frontier[0].compute, f.frontier[-1].compute * 4, 100)
            err = f.law.stderr()
            ax.plot(cs, f.law(cs), "-" if f.objective == "diffusion" else "--", color=color, lw=2,
                    label=f"{f.objective} fit: {f.law.a:.3g} C^-{f.law.b:.3f}±{err['b']:.3f} + {f.law.c:.2f}±{err['c']:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel("training loss (nats/token; DLM: ELBO)")
    text = title
    if multiplier is not None and math.isfinite(multiplier.value):
        lo, hi = multiplier.interval
        text += f"\nDLM needs {multiplier.value:.1f}x AR compute (68%: {lo:.1f}-{hi:.1f}x)"
    ax.set_title(text.strip(), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
