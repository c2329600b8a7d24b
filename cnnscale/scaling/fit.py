"""Fitting the model's terms (:mod:`cnnscale.scaling.terms`) on one part of a lab matrix and checking them on the
other, and the figures that judge a prediction.

A :class:`Case` is one measured point as the model sees it: N, the gradient bytes and bucket size, the single-worker
compute time, the compute_only calibration at N, the interconnect fitted for its own profile and N (one per
all-reduce form: ``ring`` and ``gloo``), and the measured efficiency (the median over its repeats).

**The split** (:class:`Split`): the cases whose N (or profile) is in ``values`` are fitted, the others checked.
The fitted values are the ones the terms cannot know from the records: the overlap fraction (c), the per-bucket
cost (b), the straggler's share (d), the contention factor (e) and the communication's CPU cost per byte (f).
:func:`fit_terms` fits them on the fit cases that are ruled by the link, and nothing else: the CPU cost (f) to how
much longer the forward+backward took in training than in the compute_only calibration at the same N (when the
records have both), the communication's values (b, c, e) to the exposed communication DDP's hook timed (when it
did), the straggler's share to the efficiency (mean |error| in points).

**The scheduler rule** (:func:`scheduler_ruled`): a point is ruled by the OS scheduler rather than by the link when
its compute_only calibration at N alone loses at least :data:`COLOC_LOSS_MIN` of the efficiency (N processes
slowing each other's compute, e.g. 4 processes on 2 cores) and the communication the base model predicts there is
under :data:`COMM_SHARE_MAX` of the step. Such points are shown, counted in the error figures, reported apart too,
and never fitted. Pure arithmetic; a fit costs a few ms per case.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cnnscale.scaling.model import Interconnect
from cnnscale.scaling.terms import BASE, Terms, compute_at, efficiency, step_s, wire_bytes

__all__ = ["Case", "Split", "predict", "predict_exposed_s", "free_values", "scheduler_ruled", "fit_terms", "fit_target",
           "error_figures", "fit_comm_cpu", "OVERLAPS", "BUCKET_COSTS_S", "STRAGGLER_FRACS", "CONTENTIONS", "BOUNDS",
           "COLOC_LOSS_MIN", "COMM_SHARE_MAX", "SPLIT_KINDS", "COMM_VALUES"]

COLOC_LOSS_MIN = 0.10
"""The scheduler rule: the compute_only calibration at N loses at least this much efficiency by itself ..."""
COMM_SHARE_MAX = 0.10
"""... and the predicted communication is under this share of the predicted step."""
OVERLAPS = tuple(i / 50 for i in range(51))
BUCKET_COSTS_S = tuple(i * 0.25e-3 for i in range(81))
STRAGGLER_FRACS = tuple(i / 50 for i in range(51))
CONTENTIONS = tuple(i / 20 for i in range(-10, 121))
COMM_CPU_S_PER_BYTE = tuple(i * 0.25e-9 for i in range(81))
SPLIT_KINDS = ("n", "profile")


@dataclass(frozen=True)
class Case:
    """One lab point for the model (see the module docstring); ``ics``: algorithm (ring, gloo) -> interconnect."""

    label: str
    n: int
    profile: str
    nbytes: float
    bucket_mb: float
    compute1_s: float
    computeN_s: float | None
    ics: dict[str, Interconnect] = field(hash=False)
    measured: float | None = None
    compression: float = 1.0
    """fp32 gradient bytes per byte on the wire (2 under an fp16/bf16 hook)."""
    largest_bytes: float = 0.0
    """The largest layer's fp32 gradient bytes (DDP's first bucket, term b)."""
    measured_exposed_s: float | None = None
    """The exposed communication per step DDP's hook timed (median over the repeats), None when not timed."""
    measured_compute_s: float | None = None
    """The forward+backward time per step of the point (median share x median step), None when not recorded."""
    calib_compute_s: float | None = None
    """The same of its compute_only calibration at N (term f's fit: the growth between the two)."""
    layers: tuple[tuple[float, float], ...] = ()
    """(parameters, cost) per layer of the model in forward order (term g; :mod:`cnnscale.profile.layers`)."""


@dataclass(frozen=True)
class Split:
    """Fit on the cases whose ``kind`` (``n`` or ``profile``) is one of ``values``; check on the others."""

    kind: str
    values: tuple

    def fits(self, case: Case) -> bool:
        """Whether ``case`` is in the fit part."""
        return (case.n if self.kind == "n" else case.profile) in self.values

    def describe(self) -> str:
        """E.g. ``fit on N in {2, 4}, checked on the others``."""
        what = "N" if self.kind == "n" else "profile"
        return f"fit on {what} in {{{', '.join(map(str, self.values))}}}, checked on the others"


def _ic(case: Case, terms: Terms) -> Interconnect:
    return case.ics.get(terms.algorithm) or case.ics["ring"]


def predict(case: Case, terms: Terms = BASE) -> float:
    """Predicted efficiency of ``case`` with ``terms``."""
    return efficiency(case.compute1_s, case.nbytes, case.n, _ic(case, terms), case.bucket_mb, terms,
                      case.computeN_s, compression=case.compression, largest_bytes=case.largest_bytes,
                      layers=case.layers)


def predict_exposed_s(case: Case, terms: Terms = BASE) -> float:
    """The communication the model leaves exposed per step for ``case`` (step less the compute at N), seconds."""
    ic = _ic(case, terms)
    step = step_s(case.compute1_s, case.nbytes, case.n, ic, case.bucket_mb, terms, case.computeN_s,
                  compression=case.compression, largest_bytes=case.largest_bytes, layers=case.layers)
    return step - compute_at(case.n, case.compute1_s, case.computeN_s, terms, case.nbytes)


def scheduler_ruled(case: Case) -> bool:
    """The module docstring's rule: the calibration alone loses >= COLOC_LOSS_MIN and the base model's
    communication (ring, the point's interconnect, compute at N from the calibration) is < COMM_SHARE_MAX of the
    step. False without a calibration."""
    if not case.computeN_s or case.n <= 1:
        return False
    coloc_loss = 1 - case.compute1_s / case.computeN_s
    base = Terms(straggler=True)
    comm = predict_exposed_s(case, base)
    return coloc_loss >= COLOC_LOSS_MIN and comm < COMM_SHARE_MAX * (case.computeN_s + comm)


def _loss(cases: Sequence[Case], terms: Terms) -> float:
    errs = [abs(predict(c, terms) - c.measured) for c in cases if c.measured is not None]
    return sum(errs) / len(errs) if errs else 0.0


BOUNDS = {"overlap": (0.0, 1.0), "bucket_cost_s": (0.0, 0.02), "straggler_frac": (0.0, 1.0), "contention": (-0.5, 6.0),
          "comm_cpu_s_per_byte": (0.0, 2e-8)}
"""The fitted values' ranges (contention below 0: training's all-reduce faster than the benchmark's, as
:mod:`cnnscale.scaling.terms` term (e) says)."""


def free_values(terms: Terms) -> list[str]:
    """The names of the values :func:`fit_terms` fits for ``terms`` (the terms that are on)."""
    return list(_active(terms))


def _active(terms: Terms) -> dict[str, tuple]:
    """The fitted values of the terms that are on, with their coarse grids."""
    grids: dict[str, tuple] = {}
    if terms.overlap is not None:
        grids["overlap"] = OVERLAPS
    if terms.first_bucket or terms.bucket_cost_s > 0:
        grids["bucket_cost_s"] = BUCKET_COSTS_S
    if terms.straggler:
        grids["straggler_frac"] = STRAGGLER_FRACS
    if terms.contention is not None:
        grids["contention"] = CONTENTIONS
    if terms.comm_cpu_s_per_byte is not None:
        grids["comm_cpu_s_per_byte"] = COMM_CPU_S_PER_BYTE
    return grids


def _clamp(x: list[float]) -> list[float]:
    return [min(max(v, 0.0), 1.0) for v in x]


def _toward(centre: list[float], worst: list[float], t: float) -> list[float]:
    """The point ``centre + t (worst - centre)``, clamped into the box (t = -1: reflection, -2: expansion)."""
    return _clamp([c + t * (w - c) for c, w in zip(centre, worst)])


def _nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.1, iters: int = 300
                 ) -> list[float]:
    """Minimise ``f`` over [0, 1]^k from ``x0`` (points clamped into the box): the downhill simplex."""
    simplex = [_clamp(x0)] + [_clamp([v + (step if i == j else 0.0) for j, v in enumerate(x0)])
                              for i in range(len(x0))]
    scored = sorted((f(x), x) for x in simplex)
    for _ in range(iters):
        (f_best, _), (f_worst, worst) = scored[0], scored[-1]
        centre = [sum(x[i] for _, x in scored[:-1]) / (len(scored) - 1) for i in range(len(x0))]
        refl = _toward(centre, worst, -1.0)
        f_refl = f(refl)
        if f_refl < f_best:
            exp = _toward(centre, worst, -2.0)
            f_exp = f(exp)
            scored[-1] = (f_exp, exp) if f_exp < f_refl else (f_refl, refl)
        elif f_refl < scored[-2][0]:
            scored[-1] = (f_refl, refl)
        else:
            con = _toward(centre, worst, 0.5)
            f_con = f(con)
            if f_con < f_worst:
                scored[-1] = (f_con, con)
            else:  # shrink toward the best point
                bx = scored[0][1]
                scored = [scored[0]] + [(f(y), y) for y in ([b + 0.5 * (v - b) for b, v in zip(bx, x)]
                                                            for _, x in scored[1:])]
        scored.sort()
        if scored[-1][0] - scored[0][0] < 1e-7:
            break
    return scored[0][1]


def _minimise(loss: Callable[[Terms], float], terms: Terms, grids: dict[str, tuple], rounds: int = 2) -> Terms:
    """The values named by ``grids`` that minimise ``loss``: coordinate descent over each grid for a start, then
    the downhill simplex over all of them together (they trade off against each other)."""
    best, best_loss = terms, loss(terms)
    for _ in range(rounds):
        before = best_loss
        for name, grid in grids.items():
            for v in grid:
                trial = replace(best, **{name: v})
                trial_loss = loss(trial)
                if trial_loss < best_loss - 1e-12:
                    best, best_loss = trial, trial_loss
        if best_loss >= before - 1e-12:
            break
    names = list(grids)
    lo, hi = [BOUNDS[n][0] for n in names], [BOUNDS[n][1] for n in names]

    def at(x: list[float]) -> Terms:
        return replace(best, **{n: a + v * (b - a) for n, a, b, v in zip(names, lo, hi, x)})

    x = _nelder_mead(lambda x: loss(at(x)), [(getattr(best, n) - a) / (b - a) for n, a, b in zip(names, lo, hi)])
    return at(x) if loss(at(x)) < best_loss else best


def _comm_loss(cases: Sequence[Case], terms: Terms) -> float:
    """Mean |predicted - measured exposed communication|, as a share of the measured step at N."""
    errs = [abs(predict_exposed_s(c, terms) - c.measured_exposed_s) * c.measured / c.compute1_s for c in cases]
    return sum(errs) / len(errs)


COMM_VALUES = ("overlap", "bucket_cost_s", "contention")
"""The values that shape the communication alone (terms b, c, e), fitted to DDP's hook when it timed it."""


def _growth(c: Case) -> tuple[float, float] | None:
    """(bytes a rank sends, seconds the forward+backward grew against the calibration) of ``c``, or None."""
    if c.measured_compute_s is None or c.calib_compute_s is None or c.n <= 1:
        return None
    return wire_bytes(c.nbytes, c.n), c.measured_compute_s - c.calib_compute_s


def fit_comm_cpu(cases: Sequence[Case]) -> float | None:
    """Term (f)'s seconds per byte: the least-squares line through the origin of the forward+backward's growth
    (training against the compute_only calibration at the same N) on the bytes each rank sends, clamped into
    :data:`BOUNDS`; None when no case has both times."""
    pairs = [g for g in map(_growth, cases) if g is not None and g[0] > 0]
    if not pairs:
        return None
    k = sum(x * y for x, y in pairs) / sum(x * x for x, _ in pairs)
    lo, hi = BOUNDS["comm_cpu_s_per_byte"]
    return min(max(k, lo), hi)


def fit_target(cases: Sequence[Case], split: Split) -> str:
    """What :func:`fit_terms` fits the communication's values to on ``split``: ``hook`` (the exposed communication
    DDP's hook timed, on every fit case) or ``efficiency``."""
    train = [c for c in cases if split.fits(c) and c.measured is not None and not scheduler_ruled(c)]
    return "hook" if train and all(c.measured_exposed_s is not None for c in train) else "efficiency"


def fit_terms(cases: Sequence[Case], terms: Terms, split: Split) -> Terms:
    """``terms`` with its fitted values (overlap when term c is on, bucket cost when b is, straggler share when d
    is, contention when e is) chosen on the fit part of ``split`` (link-ruled cases with a measured efficiency).

    Where DDP's hook timed the exposed communication of the fit cases (``measured_exposed_s``), the communication's
    values (b, c, e) are fitted to it first, so that they cannot stand in for a compute slow-down, and then the
    straggler share (d) to the efficiency; else all of them to the efficiency together. ``terms`` unchanged when
    there is nothing to fit on. Cost: ~0.1 s for 30 cases."""
    train = [c for c in cases if split.fits(c) and c.measured is not None and not scheduler_ruled(c)]
    grids = _active(terms)
    if not train or not grids:
        return terms
    if "comm_cpu_s_per_byte" in grids and (k := fit_comm_cpu(train)) is not None:
        terms = replace(terms, comm_cpu_s_per_byte=k)
        grids.pop("comm_cpu_s_per_byte")
        if not grids:
            return terms
    comm = {k: v for k, v in grids.items() if k in COMM_VALUES}
    if comm and fit_target(cases, split) == "hook":
        terms = _minimise(lambda t: _comm_loss(train, t), terms, comm)
        grids = {k: v for k, v in grids.items() if k not in COMM_VALUES}
        if not grids:
            return terms
    return _minimise(lambda t: _loss(train, t), terms, grids)


def error_figures(errors_pts: Sequence[float]) -> dict[str, float | int | None]:
    """``{"n", "median", "worst"}`` of the absolute errors in points (None for no errors)."""
    vals = [abs(e) for e in errors_pts]
    if not vals:
        return {"n": 0, "median": None, "worst": None}
    return {"n": len(vals), "median": statistics.median(vals), "worst": max(vals)}
