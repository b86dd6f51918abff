r"""The decomposed planner: a search over the round time T with independent per-class subproblems.

Same model as ``fedpipe.planning.milp`` (its (1)-(7)), solved by exploiting its structure.

(D1) Hardware groups. Servers couple only through T (and flora's stack download). For a fixed T
     each class k maximises omega_k f_j gain_k subject to its own memory and round time; omega_k
     scales that objective and does not change its argmax, so classes with the same hardware
     (memory, TFLOP/s, links, device, allowed bits) take the same configuration whatever their
     sample counts. Group h carries Omega_h = sum of its classes' omega_k. The work below grows
     with the number of hardware groups H, not with the number of servers.

(D2) Cost groups. Every adapter cost in cost.py (memory, compute, bytes) is linear in the rank and
     depends on the matrix only through d_out + d_in, so matrices with equal d_out + d_in (at
     most three sets in a Llama layout: q/o, k/v, gate/up/down) are interchangeable in cost.
     With u = gcd of the rank ladder, a set g given a total of R_g rank units gains at best
         H_g(R) = max { sum_a w_a g(r_a) : sum_a r_a / u <= R },
     a multiple-choice knapsack solved exactly once by dynamic programming over its matrices
     (independent of servers and configurations; rebuilt by traceback).

(D3) Class subproblem. For group h, configuration j = (bits, batch, density, wire precision) and
     time budget T:
         P_hj(T) = max sum_g H_g(R_g)  s.t.  sum_g m_jg R_g <= M_h - F_hj          (memory, GiB)
                                             sum_g t_hjg R_g <= T - C_hj [- D/down_h]   (time, s)
     with m_jg, t_hjg the memory and time of u rank units on a matrix of set g (the density and
     precision scale the transfer part of t_hjg by v(d, p), fedpipe.precision.bytes_per_value;
     (density, precision) pairs that send no fewer bytes either way and keep no more quality
     than another are left out, Problem.wire_options: they never change the optimum). Q_h(T) =
     max_j f_j P_hj(T) is a nondecreasing step function of T.

(D4) Bounds for (D3). Replacing H_g by its concave envelope (the LP relaxation of the chord
     model: rank increments sorted by gain per unit) gives LP_hj(T) >= P_hj(T). With one row
     tight the LP is a greedy prefix in that row's order (a precomputed curve per cost shape);
     with both tight it is a concave maximisation on a line (two sets: a point). The integer
     optimum is searched around the LP solution (the smaller sets within +-WINDOW units, the
     largest set taking what the budgets leave), or over all combinations when they are few,
     which is exact: the bound is then P_hj itself. LP_hj is concave in T, so a backward
     difference bounds its slope. Once T - C_hj covers the memory-only answer, it is reused.

(D5) Search over T. The objective is Phi(T) = phi(sum_h Omega_h Q_h(T), T) with phi(q, T) =
     q - lambda T / T_ref (weighted) or q / T (rate; ``Problem.score``), increasing in q and
     decreasing in T. For T in [a, b], since Q_h is nondecreasing and LP_hj concave,
         Phi(T) <= min( phi(U(b), a),  max( phi(U(a), a),  phi(V(a, b), b) ) ),
         V(a, b) = sum_h Omega_h max_j f_j [LP_hj(a) + s_hj (b - a)]
     with U = sum_h Omega_h max_j f_j LP_hj (P_hj where exact) and s_hj the slope bound. The
     tangent sum V(a, T) is convex piecewise linear in T, a max of lines c + s T: minus a line it
     is convex, and over T each (c + s T) / T = c / T + s is monotone, so under either phi its
     maximum on [a, b] sits at an end. Branch and bound on
     T: evaluate a grid, keep the best plan (its makespan T' <= T counts, not T), split every
     interval whose bound exceeds the best by more than the tolerance (or, where single points
     already carry a larger LP gap, by more than half that gap); then sample up to REFINE_POINTS
     more T's in the intervals that may still hide a better plan. The reported gap is
     (bound - best) / |bound| over all intervals and points: a proof, not an estimate. T ranges
     from the slowest group's fastest no-adapter round to where no group can use more time (or
     the deadline); below it some group cannot run, above it Phi only falls.
     Exactness for the rate: the plan found at T has quality >= Q*(T), the best quality of any
     plan with makespan <= T, and makespan T' <= T, so its rate is >= Q*(T) / T; at T = the
     optimal plan's makespan that is the optimal rate. Hence max_T over the points is exact,
     and the bounds above (with phi = q / T) prove it.

(D6) flora: every server downloads the stack D = sum_k c_k P_k (4 bytes a parameter). With D
     fixed the problem is (D3)-(D5) with the constant D/down_h in each round time and no own
     download. The D = 0 search is a relaxation, so its bound is a valid upper bound and the
     gap is reported against it (a loose one: the stack is the whole point of flora). Plans:
     a stack byte costs every server download time, so at price mu (objective per byte) group h
     stops adding parameters whose gain per parameter falls below 4 mu c_h / (Omega_h f_j); for
     mu = 0 and mu0 * 2^k, k = -3..2 (mu0: lambda / T_ref times the seconds per byte of the
     slowest downlink) up to FLORA_ITERATIONS fixed-point steps set the assumed D to the plan's
     own. Every candidate is evaluated with its true stack; the best feasible one is returned
     (memory does not depend on D; a deadline is checked on true times). No optimality claim.

(D8) Rate objective: constraint (8) of the MILP (every class trains) holds at every T from
     max_h min_j [C_hj + the time of one matrix at the smallest rank that fits in memory]: from
     there every group can adapt something, and the best quality at T does. So the search
     starts there, and a point where a group's best quality is 0 counts as infeasible. (A
     group whose only affordable matrices score importance 0 is thus infeasible here, where the
     MILP would adapt one of them for nothing: the gain tables never pick a zero gain.)
     (D6) prices flora's stack at the first plan's rate per second (the price at which
     F(lambda) = max q - lambda T is solved by the rate optimum).

(D7) The homogeneous baseline is (D3) without the time row: one configuration for all, memory
     rows of the tightest cuda and the tightest cpu server; it communicates at the densest
     density and the widest precision of the ladders (quality only, no time to save).

(D9) Spread (``candidates.selection``, constraint (9) of the MILP): a class adapting s matrices
     adapts exactly the set S_s, every member at least at the smallest rank r_1. First the
     search without the rule runs: its plan is the answer when it obeys the rule (a relaxation
     whose optimum is feasible is optimal), as it does whenever every candidate gets adapted.
     Otherwise each count s is a variant with its own gain tables H_g^s over S_s's members from
     r_1 up (the forced part's units and gain added), and (D3) becomes the best over variants:
     the LP bounds of all variants first (envelopes only), then the integers from the highest
     bound down, skipping a variant wherever its bound cannot beat the best found (so most gain
     tables are never built). The bound is the largest over variants; a maximum of concave LP
     bounds is not concave, so no tangents: the intervals use the monotone bound alone. Spread
     sets of many matrices use greedy-prefix tables above VARIANT_DP_CELLS (achievable; the
     reported gap stays a proof).

Status is "optimal" when the proven gap is at most OPTIMAL_GAP (HiGHS's own tolerance in the
MILP, gapRel 1e-4), else "feasible" with that gap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, reduce

import numpy as np

from fedpipe.plan import SolverReport
from fedpipe.planning.cost import WIRE_BYTES_PER_VALUE
from fedpipe.planning.problem import Choice, Problem, evaluate, hardware_key, is_feasible
from fedpipe.profile import Server
from fedpipe.shapes import Matrix

OPTIMAL_GAP = 1e-4  # the MILP's gapRel: below it both methods say "optimal"
TARGET_GAP = 1e-6  # the search stops refining below this proven gap
WINDOW = 4  # +- units searched around the LP solution per enumerated cost group
EXHAUSTIVE_COMBOS = 4096  # enumerate every combination of the smaller groups up to this many
DP_CELLS = 20_000_000  # items x capacity above which H_g falls back to the greedy prefix
VARIANT_DP_CELLS = 100_000  # the same for a spread set's tables (D9): hundreds may be needed
CHUNK_CELLS = 2_000_000  # queries x combinations evaluated per numpy call
INITIAL_GRID = 33
REFINE_POINTS = 512  # extra T's sampled where the bound still allows a better plan
REFINE_BATCH = 64
MAX_ROUNDS = 60
FLORA_ITERATIONS = 4  # fixed-point steps per stack price
FLORA_REFINE = 64
GOLDEN_STEPS = 80
SOLVER_NAME = "builtin"


# ---------------------------------------------------------------- (D2) tables per cost group
@dataclass
class CostGroup:
    """Matrices with equal d_out + d_in: their exact gain table (built on first use: the LP
    bound needs only the envelope) and its concave envelope."""

    rep: Matrix  # a member of the group (its costs stand for all)
    names: list[str]
    kinds: list[str]
    weights: np.ndarray
    units: np.ndarray  # of the rank ladder's levels
    gains: np.ndarray
    rmax: int  # the most rank units the group can take
    exact: bool  # small enough for the DP (else greedy prefixes: achievable, not proven best)
    env_x: np.ndarray  # envelope breakpoints: cumulative units
    env_y: np.ndarray  # and cumulative gain
    seg_slope: np.ndarray  # sorted segments (gain per unit), their lengths and items/levels
    seg_len: np.ndarray
    seg_item: np.ndarray
    seg_level: np.ndarray

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.exact:
            return _dp(self.weights, self.units, self.gains)
        ends = self.env_x.astype(np.int64)
        return self.env_y[np.searchsorted(ends, np.arange(self.rmax + 1), side="right") - 1], None

    @property
    def H(self) -> np.ndarray:
        """Best gain for R rank units, R = 0..rmax."""
        return self._table[0]

    @property
    def choice(self) -> np.ndarray | None:
        """DP traceback (items x R) -> level, None for the greedy fallback."""
        return self._table[1]

    def levels_for(self, R: int, units: np.ndarray) -> np.ndarray:
        """Level index per matrix reaching the table value H[R]."""
        n = len(self.names)
        out = np.zeros(n, dtype=np.int64)
        if self.choice is not None:
            for i in range(n - 1, -1, -1):
                lv = int(self.choice[i, R])
                out[i] = lv
                R -= int(units[lv])
            return out
        k = int(np.searchsorted(np.cumsum(self.seg_len), R, side="right"))  # greedy prefix
        for item, lv in zip(self.seg_item[:k], self.seg_level[:k], strict=True):
            out[item] = max(out[item], lv)
        return out


def _dp(weights: np.ndarray, units: np.ndarray, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiple-choice knapsack: best sum w_a gains[l_a] with sum units[l_a] <= R, every R."""
    cap = len(weights) * int(units[-1])
    best = np.zeros(cap + 1)
    choice = np.zeros((len(weights), cap + 1), dtype=np.int8 if len(units) < 128 else np.int16)
    for i, w in enumerate(weights):
        new, pick = best.copy(), np.zeros(cap + 1, dtype=choice.dtype)
        for lv in range(1, len(units)):
            du = int(units[lv])
            cand = np.full(cap + 1, -np.inf)
            cand[du:] = best[:cap + 1 - du] + w * gains[lv]
            better = cand > new
            new[better], pick[better] = cand[better], lv
        best, choice[i] = new, pick
    return best, choice


class Tables:
    """Everything that depends on the model and the rank ladder, not on the servers.

    By default every candidate from rank 0 up; a spread set (D9) passes its `members`, `floor` = 1
    (each member carries at least the smallest rank: units and gains count from there) and the
    full tables as `like`, whose cost groups it keeps, in the same order."""

    def __init__(self, problem: Problem, members: list[Matrix] | None = None, floor: int = 0,
                 like: Tables | None = None, dp_cells: int = DP_CELLS) -> None:
        ranks = sorted(problem.ranks)
        positive = [r for r in ranks if r > 0]
        self.unit = reduce(math.gcd, positive)
        self.ranks = ranks[floor:]
        self.units = np.array([(r - self.ranks[0]) // self.unit for r in self.ranks], dtype=np.int64)
        self.gains = np.array([problem.gain(r) - problem.gain(self.ranks[0]) for r in self.ranks])
        by_size: dict[int, list[Matrix]] = {g.rep.lora_params(1): [] for g in (like.groups if like else [])}
        for m in problem.matrices if members is None else members:
            by_size.setdefault(m.lora_params(1), []).append(m)
        reps = {g.rep.lora_params(1): g.rep for g in like.groups} if like else {}
        groups = []
        for size, group_members in by_size.items():
            group_members.sort(key=lambda m: -problem.weights[m.name])
            groups.append(self._group(reps.get(size) or group_members[0], group_members,
                                      problem.weights, dp_cells))
        if like is None:
            groups.sort(key=lambda g: g.rmax)  # the largest set is the one the budgets fill (D4)
        self.groups = groups
        self.rmax = np.array([g.rmax for g in groups], dtype=np.int64)
        self.exact_tables = all(g.exact for g in groups)
        self._curves: dict[bytes, tuple] = {}

    def _group(self, rep: Matrix, members: list[Matrix], weights: dict[str, float],
               dp_cells: int) -> CostGroup:
        w = np.array([weights[m.name] for m in members])
        du = np.diff(self.units)
        dg = np.diff(self.gains)
        slope = (w[:, None] * (dg / du)[None, :]).ravel()
        length = np.tile(du, len(w))
        item = np.repeat(np.arange(len(w)), len(du))
        level = np.tile(np.arange(1, len(self.units)), len(w))
        order = np.lexsort((level, item, -slope))  # g is concave on the ladder: nests per item
        seg_slope, seg_len, seg_item, seg_level = slope[order], length[order], item[order], level[order]
        env_x = np.concatenate([[0], np.cumsum(seg_len)]).astype(float)
        env_y = np.concatenate([[0.0], np.cumsum(seg_slope * seg_len)])
        cap = len(w) * int(self.units[-1])
        return CostGroup(rep, [m.name for m in members], [m.kind for m in members], w, self.units,
                         self.gains, cap, len(w) * (cap + 1) <= dp_cells, env_x, env_y, seg_slope,
                         seg_len, seg_item, seg_level)

    def envelope(self, g: int, R: np.ndarray) -> np.ndarray:
        grp = self.groups[g]
        return np.interp(R, grp.env_x, grp.env_y)

    def curve(self, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The single-constraint LP for costs `shape` per unit: cumulative cost, gain, units per group."""
        key = shape.tobytes()
        if key not in self._curves:
            slope, length, grp = [], [], []
            for g, group in enumerate(self.groups):
                slope.append(group.seg_slope / shape[g])
                length.append(group.seg_len.astype(float))
                grp.append(np.full(len(group.seg_len), g))
            slope, length, grp = np.concatenate(slope), np.concatenate(length), np.concatenate(grp)
            order = np.argsort(-slope, kind="stable")
            slope, length, grp = slope[order], length[order], grp[order]
            cost = length * shape[grp]
            cum_cost = np.concatenate([[0.0], np.cumsum(cost)])
            cum_gain = np.concatenate([[0.0], np.cumsum(slope * cost)])
            cum_units = np.zeros((len(cost) + 1, len(self.groups)))
            for g in range(len(self.groups)):
                cum_units[1:, g] = np.cumsum(np.where(grp == g, length, 0.0))
            self._curves[key] = (cum_cost, cum_gain, cum_units)
        return self._curves[key]

    def ranks_for(self, R: np.ndarray) -> dict[str, int]:
        """Concrete ranks for R units per group; within a type the most important get the most."""
        by_kind: dict[str, list[tuple[str, float]]] = {}
        chosen: dict[str, list[int]] = {}
        for g, grp in enumerate(self.groups):
            levels = grp.levels_for(int(R[g]), self.units)
            for name, kind, w, lv in zip(grp.names, grp.kinds, grp.weights, levels, strict=True):
                by_kind.setdefault(kind, []).append((name, w))
                chosen.setdefault(kind, []).append(self.ranks[lv])
        out = {}
        for kind, members in by_kind.items():
            order = sorted(range(len(members)), key=lambda i: -members[i][1])
            for i, r in zip(order, sorted(chosen[kind], reverse=True), strict=True):
                if r > 0:
                    out[members[i][0]] = r
        return out


def tables_for(problem: Problem) -> Tables:
    """The problem's tables, built once (the baseline and the search share them)."""
    return problem.cache.get(("gain tables", tuple(problem.ranks)), lambda: Tables(problem))


@dataclass
class Variant:
    """(D9) One set of matrices a class may adapt: the gains of ranks above its forced part."""

    build: Callable[[], Tables]  # its tables, built on first use (most variants never are)
    forced: np.ndarray  # units per cost group every member carries (spread: the smallest rank)
    base_gain: float  # the gain of the forced part
    ceiling: float  # its gain with every member at the largest rank: no budget gives more

    @cached_property
    def tables(self) -> Tables:
        return self.build()

    def ranks_for(self, R: np.ndarray) -> dict[str, int]:
        return self.tables.ranks_for(R - self.forced)


def variants_for(problem: Problem) -> list[Variant]:
    """(D9): one variant (any set, nothing forced) under importance; one per count under spread."""
    tables = tables_for(problem)
    if not problem.restricted:
        return [Variant(lambda: tables, np.zeros(len(tables.groups), dtype=np.int64), 0.0, np.inf)]

    def build() -> list[Variant]:
        first = min(r for r in problem.ranks if r > 0)
        key_of = {g.rep.lora_params(1): i for i, g in enumerate(tables.groups)}
        out = []
        for _, names in sorted(problem.adaptable_sets.items()):
            members = [m for m in problem.matrices if m.name in names]
            forced = np.zeros(len(tables.groups), dtype=np.int64)
            for m in members:
                forced[key_of[m.lora_params(1)]] += first // tables.unit
            weight = sum(problem.weights[m.name] for m in members)
            out.append(Variant(lambda members=members: Tables(problem, members, 1, tables,
                                                              VARIANT_DP_CELLS), forced,
                               weight * problem.gain(first), weight * problem.gain(max(problem.ranks))))
        return out

    return problem.cache.get(("spread variants", tuple(problem.ranks)), build)


def solve_variants(variants: list[Variant], rows: Rows, time_shape: np.ndarray | None = None,
                   ceiling: np.ndarray | None = None,
                   hint: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(D9) (D3)/(D4) over every variant: the best integer value, the largest bound, the units
    (forced part included), the variant, (given the time row's `time_shape`) the most rank units
    in time that any variant's integer or LP answer needs, and each variant's bound (Q x V).

    `ceiling` (Q x V, default each variant's own ceiling): bounds of each variant with more
    budget, which cap its LP bound here. A variant's integer answer is sought only where its
    bound beats the best value found so far, variants in the order of their best bound: most
    of them never need their gain tables. `hint` (Q,): a variant per query likely to be good,
    solved first so that its value prunes the others (the memory-only answer's)."""
    Q, G = len(rows.budget1), len(variants[0].forced)
    best_v, best_R = np.full(Q, -np.inf), np.zeros((Q, G), dtype=np.int64)
    best_i, need = np.zeros(Q, dtype=np.int64), np.zeros(Q)
    if ceiling is None:
        ceiling = np.broadcast_to(np.array([v.ceiling for v in variants]), (Q, len(variants)))
    each = ceiling.copy()
    window = (2 * WINDOW + 1) ** (G - 1)  # enumerate a variant where that costs no more than (D4)
    forced = np.stack([v.forced for v in variants], axis=1)  # (G, V)
    left1 = rows.budget1[:, None] - rows.costs(1) @ forced  # (Q, V): budgets after the forced part
    left2 = rows.budget2[:, None] - rows.costs(2) @ forced
    forced_fits = (left1 >= 0) & (left2 >= 0)
    each[~forced_fits] = -np.inf
    lp: dict[int, tuple] = {}

    def relax(i: int, mask: np.ndarray) -> None:
        """Variant i's LP bound where `mask` and its forced part fit."""
        var, fits = variants[i], forced_fits[:, i] & mask
        if not fits.any():
            return
        sub = _subset(rows, fits)
        sub.budget1, sub.budget2 = left1[fits, i], left2[fits, i]
        idx = np.nonzero(fits)[0]
        b, lp_R = lp_bound(var.tables, sub)
        b = np.minimum(b + var.base_gain, ceiling[idx, i])
        each[idx, i] = b
        if time_shape is not None:
            need[idx] = np.maximum(need[idx], np.nan_to_num(lp_R + var.forced) @ time_shape)
        lp[i] = (idx, sub, b, lp_R)

    def settle(i: int) -> None:
        """Variant i's integer answer where its bound beats the best found."""
        var, (idx, sub, b, lp_R) = variants[i], lp.pop(i)
        promising = b > best_v[idx]  # the gain tables are built only where they may matter
        if not promising.any():
            return
        idx, sub, lp_R = idx[promising], _subset(sub, promising), lp_R[promising]
        if exhaustive_possible(var.tables, min(EXHAUSTIVE_COMBOS, window)):
            v, R = integer_solve(var.tables, sub, None, True)
            each[idx, i] = v + var.base_gain
        else:
            v, R = integer_solve(var.tables, sub, lp_R, False)
        v = v + var.base_gain
        better = v > best_v[idx]
        best_v[idx[better]], best_R[idx[better]], best_i[idx[better]] = v[better], R[better] + var.forced, i
        if time_shape is not None:
            need[idx] = np.maximum(need[idx], (R + var.forced) @ time_shape)

    for i in np.unique(hint) if hint is not None else []:  # incumbents first: they prune the rest
        relax(int(i), hint == i)
        if int(i) in lp:
            settle(int(i))
    for i in np.nonzero((forced_fits & (ceiling > best_v[:, None])).any(axis=0))[0]:
        relax(int(i), ceiling[:, i] > best_v)
    for i in sorted(lp, key=lambda i: -float(lp[i][2].max())):
        settle(i)
    bound = np.where(np.isfinite(best_v), np.maximum(best_v, each.max(axis=1)), -np.inf)
    return best_v, bound, best_R, best_i, need, each


# ---------------------------------------------------------------- (D3)/(D4) vectorised subproblem
@dataclass
class Rows:
    """Two knapsack rows per query: costs per unit (Q x G) as scale x shape, and budgets (Q,)."""

    shape1: np.ndarray  # (S1, G) distinct shapes
    idx1: np.ndarray  # (Q,) shape index
    scale1: np.ndarray
    budget1: np.ndarray
    shape2: np.ndarray
    idx2: np.ndarray
    scale2: np.ndarray
    budget2: np.ndarray

    def costs(self, row: int) -> np.ndarray:
        shape, idx, scale = ((self.shape1, self.idx1, self.scale1) if row == 1
                             else (self.shape2, self.idx2, self.scale2))
        return shape[idx] * scale[:, None]


def _single(tables: Tables, shapes: np.ndarray, idx: np.ndarray, scale: np.ndarray,
            budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LP value and units per group with one row (greedy prefix, the last piece fractional)."""
    value = np.empty(len(idx))
    units = np.empty((len(idx), len(tables.groups)))
    for s in np.unique(idx):
        mask = idx == s
        cum_cost, cum_gain, cum_units = tables.curve(shapes[s])
        b = np.clip(budget[mask] / scale[mask], 0.0, cum_cost[-1])
        value[mask] = np.interp(b, cum_cost, cum_gain)
        for g in range(len(tables.groups)):
            units[mask, g] = np.interp(b, cum_cost, cum_units[:, g])
    return value, units


def _both_tight(tables: Tables, c1: np.ndarray, b1: np.ndarray, c2: np.ndarray,
                b2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """max sum_g envelope_g(R_g) with both rows tight (NaN where that set is empty)."""
    G, Q = len(tables.groups), len(b1)
    rmax = tables.rmax.astype(float)
    value, R = np.full(Q, np.nan), np.full((Q, G), np.nan)
    if G == 1 or Q == 0:
        return value, R
    # the other groups solve the 2x2 system given x = R_0 (for G == 2 there is no x: a point)
    a, b = (1, 2) if G == 3 else (0, 1)
    det = c1[:, a] * c2[:, b] - c1[:, b] * c2[:, a]
    ok = np.abs(det) > 1e-12 * np.abs(c1[:, a] * c2[:, b])
    det = np.where(ok, det, 1.0)

    def solve(x: np.ndarray) -> np.ndarray:
        r1 = b1 - (c1[:, 0] * x if G == 3 else 0.0)
        r2 = b2 - (c2[:, 0] * x if G == 3 else 0.0)
        out = np.empty((Q, G))
        if G == 3:
            out[:, 0] = x
        out[:, a] = (r1 * c2[:, b] - r2 * c1[:, b]) / det
        out[:, b] = (c1[:, a] * r2 - c2[:, a] * r1) / det
        return out

    def total(Rs: np.ndarray) -> np.ndarray:
        return sum(tables.envelope(g, np.clip(Rs[:, g], 0, rmax[g])) for g in range(G))

    tol = 1e-9 * (1 + rmax)
    if G == 2:
        Rs = solve(np.zeros(Q))
        inside = ok & np.all((Rs >= -tol) & (Rs <= rmax + tol), axis=1)
        value[inside], R[inside] = total(Rs)[inside], np.clip(Rs[inside], 0, rmax)
        return value, R
    # G == 3: R_a = p_a + q_a x, R_b = p_b + q_b x must stay in their boxes
    p, q = solve(np.zeros(Q)), solve(np.ones(Q)) - solve(np.zeros(Q))
    lo, hi = np.zeros(Q), np.full(Q, rmax[0])
    for g in (a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = -p[:, g] / q[:, g], (rmax[g] - p[:, g]) / q[:, g]
        pos, neg, flat = q[:, g] > 0, q[:, g] < 0, q[:, g] == 0
        lo = np.where(pos, np.maximum(lo, t0), np.where(neg, np.maximum(lo, t1), lo))
        hi = np.where(pos, np.minimum(hi, t1), np.where(neg, np.minimum(hi, t0), hi))
        bad = flat & ((p[:, g] < -tol[g]) | (p[:, g] > rmax[g] + tol[g]))
        hi = np.where(bad, -1.0, hi)
    ok &= hi >= lo - 1e-9
    hi = np.maximum(hi, lo)
    phi = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
    f1, f2 = total(solve(x1)), total(solve(x2))
    for _ in range(GOLDEN_STEPS):  # concave on the segment
        left = f1 >= f2
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x2n = np.where(left, x1, lo + phi * (hi - lo))
        x1n = np.where(left, hi - phi * (hi - lo), x2)
        fx = total(solve(np.where(left, x1n, x2n)))
        f1, f2 = np.where(left, fx, f2), np.where(left, f1, fx)
        x1, x2 = x1n, x2n
    x = (lo + hi) / 2
    Rs = solve(x)
    value[ok] = np.maximum(np.maximum(f1, f2), total(Rs))[ok]
    R[ok] = np.clip(Rs[ok], 0, rmax)
    return value, R


def lp_bound(tables: Tables, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """(D4): the LP value of (D3) per query and its solution in units per group."""
    c1, c2 = rows.costs(1), rows.costs(2)
    v1, R1 = _single(tables, rows.shape1, rows.idx1, rows.scale1, rows.budget1)
    v2, R2 = _single(tables, rows.shape2, rows.idx2, rows.scale2, rows.budget2)
    fits1 = np.einsum("qg,qg->q", c2, R1) <= rows.budget2 * (1 + 1e-12) + 1e-300
    fits2 = np.einsum("qg,qg->q", c1, R2) <= rows.budget1 * (1 + 1e-12) + 1e-300
    value = np.where(fits1, v1, np.where(fits2, v2, np.minimum(v1, v2)))
    R = np.where(fits1[:, None], R1, np.where(fits2[:, None], R2, np.nan))
    rest = ~(fits1 | fits2)
    if rest.any():
        vd, Rd = _both_tight(tables, c1[rest], rows.budget1[rest], c2[rest], rows.budget2[rest])
        good = ~np.isnan(vd)
        sub_v, sub_R = value[rest], R[rest]
        sub_v[good] = np.minimum(sub_v[good], vd[good])
        # where the line search failed, centre on the row-1 solution scaled into row 2
        s = np.minimum(1.0, rows.budget2[rest] / np.maximum(np.einsum("qg,qg->q", c2[rest], R1[rest]),
                                                            1e-300))
        sub_R[~good] = R1[rest][~good] * s[~good, None]
        sub_R[good] = Rd[good]
        value[rest], R[rest] = sub_v, sub_R
    return value * (1 + 1e-12) + 1e-15, R


def _grid(tables: Tables, centre: np.ndarray, exhaustive: bool) -> np.ndarray:
    """Offsets to enumerate for every group but the last: (K, G-1) unit counts or deltas."""
    G = len(tables.groups)
    if G == 1:
        return np.zeros((1, 0), dtype=np.int64)
    axes = ([np.arange(tables.rmax[g] + 1) for g in range(G - 1)] if exhaustive
            else [np.arange(-WINDOW, WINDOW + 1)] * (G - 1))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def exhaustive_possible(tables: Tables, combos: int | None = None) -> bool:
    """Whether integer_solve may enumerate every combination (at most `combos`, default
    EXHAUSTIVE_COMBOS)."""
    limit = EXHAUSTIVE_COMBOS if combos is None else combos
    return int(np.prod(tables.rmax[:-1] + 1)) <= limit and tables.exact_tables


def integer_solve(tables: Tables, rows: Rows, centre: np.ndarray | None,
                  exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
    """(D4): the best integer units per group found (exact over all combinations if exhaustive).

    Returns the gain (-inf where nothing fits) and the units (Q x G)."""
    G, Q = len(tables.groups), len(rows.budget1)
    c1, c2 = rows.costs(1), rows.costs(2)
    grid = _grid(tables, centre, exhaustive)
    K = len(grid)
    best_v, best_R = np.full(Q, -np.inf), np.zeros((Q, G), dtype=np.int64)
    step = max(1, CHUNK_CELLS // K)
    last = G - 1
    for s in range(0, Q, step):
        sl = slice(s, min(Q, s + step))
        n = sl.stop - sl.start
        if exhaustive:
            Rk = np.broadcast_to(grid[None, :, :], (n, K, G - 1))
        else:
            base = np.floor(centre[sl, :last] + 1e-9).astype(np.int64)
            Rk = np.clip(base[:, None, :] + grid[None, :, :], 0, tables.rmax[:last])
        used1, used2 = np.zeros((n, K)), np.zeros((n, K))
        for g in range(last):
            used1 += Rk[:, :, g] * c1[sl, g, None]
            used2 += Rk[:, :, g] * c2[sl, g, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cap1 = (rows.budget1[sl, None] - used1) / c1[sl, last, None]
            cap2 = (rows.budget2[sl, None] - used2) / c2[sl, last, None]
        r_last = np.minimum(np.minimum(cap1, cap2), tables.rmax[last])
        ok = r_last >= 0
        r_last = np.floor(np.where(ok, r_last, 0)).astype(np.int64)
        value = tables.groups[last].H[r_last]
        for g in range(last):
            value = value + tables.groups[g].H[Rk[:, :, g]]
        value = np.where(ok, value, -np.inf)
        k = np.argmax(value, axis=1)
        rows_i = np.arange(n)
        best_v[sl] = value[rows_i, k]
        best_R[sl, :last] = Rk[rows_i, k]
        best_R[sl, last] = r_last[rows_i, k]
    return best_v, best_R


# ---------------------------------------------------------------- (D1) hardware groups
@dataclass
class Pairs:
    """Every feasible (hardware group, configuration) with its (D3) constants."""

    h: np.ndarray
    bits: np.ndarray
    batch: np.ndarray
    density: np.ndarray
    precision: list[str]
    f: np.ndarray  # quality factor of the configuration
    base_s: np.ndarray  # C_hj: base compute
    down_mbps: np.ndarray
    time_scale: np.ndarray  # seconds per parameter of adapter (compute + transfers)
    mem_idx: np.ndarray  # memory row shape index
    mem_budget: np.ndarray  # M_h - F_hj (GiB), shrunk by a hair against rounding
    mem_shapes: np.ndarray
    time_shape: np.ndarray


def build_pairs(problem: Problem, tables: Tables, reps: list[Server]) -> Pairs:
    cost, stack = problem.cost, problem.rule.broadcasts_stack
    grp_rep = [g.rep for g in tables.groups]
    unit = tables.unit
    time_shape = np.array([m.lora_params(unit) for m in grp_rep], dtype=float)
    mem_keys: dict[tuple, int] = {}
    mem_shapes: list[np.ndarray] = []
    rows: dict[str, list] = {k: [] for k in ("h", "bits", "batch", "d", "p", "f", "base", "down",
                                             "ts", "mi", "mb")}
    m0 = grp_rep[0]
    p0 = m0.lora_params(unit)
    for h, rep in enumerate(reps):
        for q, b, d, pr in problem.configs_for(rep):
            fixed = problem.fixed_memory_gib(q, b, rep.device)
            if fixed > rep.memory_gib:
                continue
            key = (b, rep.device)
            if key not in mem_keys:
                mem_keys[key] = len(mem_shapes)
                mem_shapes.append(np.array([cost.lora_memory_gib(m, unit, b, rep.device)
                                            for m in grp_rep]))
            down = 0.0 if stack else cost.wire_bytes(m0, unit, problem.down_density(d),
                                                      problem.down_precision(pr))
            per_param = (cost.lora_compute_s(m0, unit, b, rep)
                         + cost.transfer_s(cost.wire_bytes(m0, unit, d, pr), rep.uplink_mbps)
                         + cost.transfer_s(down, rep.downlink_mbps)) / p0
            rows["h"].append(h)
            rows["bits"].append(q)
            rows["batch"].append(b)
            rows["d"].append(d)
            rows["p"].append(pr)
            rows["f"].append(problem.config_factor(q, b, d, pr))
            rows["base"].append(problem.base_compute_s(q, b, rep))
            rows["down"].append(rep.downlink_mbps)
            rows["ts"].append(per_param)
            rows["mi"].append(mem_keys[key])
            rows["mb"].append((rep.memory_gib - fixed) * (1 - 1e-9))
    arr = {k: np.array(v) for k, v in rows.items()}
    return Pairs(arr["h"].astype(np.int64), arr["bits"], arr["batch"], arr["d"].astype(float),
                 rows["p"], arr["f"].astype(float),
                 arr["base"].astype(float), arr["down"].astype(float), arr["ts"].astype(float),
                 arr["mi"].astype(np.int64), arr["mb"].astype(float),
                 np.array(mem_shapes) if mem_shapes else np.zeros((0, len(grp_rep))), time_shape)


# ---------------------------------------------------------------- (D5) search over T
@dataclass
class Point:
    """The best plan found at one T: per hardware group the pair index and units."""

    T: float
    makespan: float
    quality: float  # sum_h Omega_h Q_h(T)
    bound: float  # sum_h Omega_h UB_h(T)
    objective: float
    pair: np.ndarray
    units: np.ndarray
    f_bound: np.ndarray | None = None  # (H, J) f_j LP_hj(T), -inf where absent or not fitting
    f_slope: np.ndarray | None = None  # (H, J) an upper bound on its right derivative in T
    variant: np.ndarray | None = None  # (H,) the variant per group (D9)


class TimeSearch:
    """Branch and bound over T for fixed flora stack download (seconds per Mbit/s of downlink)."""

    def __init__(self, problem: Problem, tables: Tables, pairs: Pairs, n_groups: int, Omega: np.ndarray,
                 stack_mbit: float = 0.0, cap_params: np.ndarray | None = None) -> None:
        self.problem, self.tables, self.pairs = problem, tables, pairs
        self.H, self.Omega = n_groups, Omega
        self.score = problem.score  # phi(q, T) of (D5)
        self.const = pairs.base_s + stack_mbit / pairs.down_mbps  # C_hj [+ D / down_h]
        self.cap_s = np.inf if cap_params is None else pairs.time_scale * cap_params  # (D6) caps
        self.variants = variants_for(problem)
        self.spread = problem.restricted  # (D9): no tangents, a max over variants
        self.exhaustive = not self.spread and exhaustive_possible(tables)
        rmax_time = float(np.dot(pairs.time_shape, tables.rmax))
        full = self.const + pairs.time_scale * rmax_time
        cheapest = np.full(n_groups, np.inf)
        np.minimum.at(cheapest, pairs.h, self._first_round(tables) if problem.every_server_trains
                      else self.const)
        self.t_min = float(cheapest.max())
        self.t_max = float(full.max())
        deadline = problem.profile.objective.deadline_s
        if deadline is not None:
            self.t_max = min(self.t_max, deadline * (1 - 1e-12))
        self.evaluations = 0
        per_group = [np.nonzero(pairs.h == h)[0] for h in range(n_groups)]
        self.dense = np.full((n_groups, max(len(x) for x in per_group)), -1, dtype=np.int64)
        for h, x in enumerate(per_group):
            self.dense[h, :len(x)] = x
        # memory-only answers: once the time budget covers them, (D3) no longer depends on T
        nP = len(pairs.h)
        rows = self._rows(np.arange(nP), pairs.time_scale * (rmax_time + 1.0))
        self.ceiling = None
        self.mem_value, self.mem_bound, self.mem_units, _, needs, self.mem_variant = self._solve(rows, None)
        self.free_from = pairs.time_scale * needs * (1 + 1e-9) + 1e-12

    def _first_round(self, tables: Tables) -> np.ndarray:
        """(D8) per pair the shortest round that adapts one matrix at the smallest rank within
        memory (inf where none fits)."""
        p, first = self.pairs, int(tables.units[1])
        fits = p.mem_shapes[p.mem_idx] * first <= p.mem_budget[:, None]  # (pairs, G)
        secs = self.const[:, None] + p.time_scale[:, None] * p.time_shape[None, :] * first
        return np.where(fits, secs, np.inf).min(axis=1)

    def _rows(self, pi: np.ndarray, budget1: np.ndarray) -> Rows:
        p = self.pairs
        return Rows(shape1=p.time_shape[None, :], idx1=np.zeros(len(pi), dtype=np.int64),
                    scale1=p.time_scale[pi], budget1=budget1, shape2=p.mem_shapes, idx2=p.mem_idx[pi],
                    scale2=np.ones(len(pi)), budget2=p.mem_budget[pi])

    def _solve(self, rows: Rows, delta: np.ndarray | None, pi: np.ndarray | None = None):
        """(D3)/(D4) for queries: integer value and units, bound, slope bound, the time-shape
        units the integer and LP answers need (beyond them time no longer binds), variant (D9)."""
        tables, shape = self.tables, self.pairs.time_shape
        if self.spread:  # the first call (memory only) sets every later call's ceiling
            first = self.ceiling is None
            v, bound, R, variant, need, each = solve_variants(
                self.variants, rows, shape, None if first else self.ceiling[pi],
                None if first else self.mem_variant[pi])
            if first:
                self.ceiling = each
            return v, bound, R, np.zeros(len(v)), need, variant
        only = np.zeros(len(rows.budget1), dtype=np.int64)  # the one variant
        if self.exhaustive:
            v, R = integer_solve(tables, rows, None, True)
            return v, v, R, np.zeros(len(v)), R @ shape, only
        ub, centre = lp_bound(tables, rows)
        slope = np.zeros(len(ub))
        if delta is not None:  # LP_hj is concave in T: a backward difference bounds its right derivative
            before = _subset(rows, np.ones(len(ub), dtype=bool))
            before.budget1 = before.budget1 - delta
            ub_before = np.where(before.budget1 >= 0, lp_bound(tables, before)[0], 0.0)
            slope = np.maximum(ub - ub_before, 0.0) / delta * (1 + 1e-9) + 1e-12
        v, R = integer_solve(tables, rows, centre, False)
        return v, np.maximum(ub, v), R, slope, np.maximum(R @ shape, centre @ shape), only

    def evaluate(self, Ts: np.ndarray) -> list[Point]:
        p, tables = self.pairs, self.tables
        nP, nT = len(p.h), len(Ts)
        Tq = np.repeat(Ts, nP)
        pi = np.tile(np.arange(nP), nT)
        fits = Tq - self.const[pi] >= 0
        budget = np.minimum(Tq - self.const[pi], np.broadcast_to(self.cap_s, (nP,))[pi])
        delta = 1e-6 * np.maximum(Tq, 1e-6)
        value = np.full(nP * nT, -np.inf)
        bound = np.full(nP * nT, -np.inf)
        units = np.zeros((nP * nT, len(tables.groups)), dtype=np.int64)
        slope = np.zeros(nP * nT)
        cached = budget - delta >= self.free_from[pi]
        value[cached], bound[cached] = self.mem_value[pi[cached]], self.mem_bound[pi[cached]]
        units[cached] = self.mem_units[pi[cached]]
        variant = np.zeros(nP * nT, dtype=np.int64)
        variant[cached] = self.mem_variant[pi[cached]]
        todo = fits & ~cached
        if todo.any():
            v, b, R, sl, _, variant[todo] = self._solve(self._rows(pi[todo], budget[todo]), delta[todo],
                                                                 pi[todo])
            value[todo], bound[todo], units[todo], slope[todo] = v, b, R, sl
        self.evaluations += nT
        dense, present = self.dense, self.dense >= 0
        idx = np.where(present, dense, 0)
        fq = np.where(present, (p.f[pi] * value).reshape(nT, nP)[:, idx], -np.inf)  # (nT, H, J)
        fb = np.where(present, (p.f[pi] * bound).reshape(nT, nP)[:, idx], -np.inf)
        secs = (self.const[pi] + p.time_scale[pi] * (units @ p.time_shape)).reshape(nT, nP)[:, idx]
        best_q = fq.max(axis=2)
        # per group the best quality, the fastest among equals
        ties = fq >= best_q[:, :, None] - 1e-15 * np.abs(best_q[:, :, None])
        slot = np.argmin(np.where(ties & present, secs, np.inf), axis=2)  # (nT, H)
        pick = np.take_along_axis(np.broadcast_to(dense, fq.shape), slot[:, :, None], axis=2)[:, :, 0]
        feasible = np.all(np.isfinite(best_q), axis=1)
        if self.problem.every_server_trains:  # (8), as (D8)
            feasible &= np.all(best_q > 0, axis=1)
        quality = np.where(feasible, (np.where(np.isfinite(best_q), best_q, 0) @ self.Omega), -np.inf)
        makespan = np.take_along_axis(secs, slot[:, :, None], axis=2)[:, :, 0].max(axis=1)
        bound = np.where(feasible, np.where(np.isfinite(fb.max(axis=2)), fb.max(axis=2), 0) @ self.Omega,
                         -np.inf)
        units = units.reshape(nT, nP, -1)
        fs = np.where(present, (p.f[pi] * slope).reshape(nT, nP)[:, idx], 0.0)
        keep = not self.exhaustive and not self.spread
        variant = variant.reshape(nT, nP)
        return [Point(float(Ts[t]), float(makespan[t]), float(quality[t]), float(bound[t]),
                      float(self.score(quality[t], makespan[t])) if feasible[t] else -np.inf,
                      pick[t], units[t][pick[t]], fb[t] if keep else None, fs[t] if keep else None,
                      variant[t][pick[t]])
                for t in range(nT)]

    def interval_bounds(self, pts: list[Point]) -> np.ndarray:
        """(D5) sup of Phi on each [pts[i].T, pts[i+1].T]: Q_h nondecreasing gives
        phi(b.bound, a.T); with LP bounds also the tangents at a (concavity), under phi maximal
        at an end of the interval. No tangent where a configuration starts to fit inside."""
        T = np.array([pt.T for pt in pts])
        B = np.array([pt.bound for pt in pts])
        a_T, b_T = T[:-1], T[1:]
        ub = self.score(B[1:], a_T)
        if pts[0].f_bound is None:
            return ub
        FB = np.stack([pt.f_bound for pt in pts[:-1]])  # (intervals, H, J)
        FS = np.stack([pt.f_slope for pt in pts[:-1]])
        w = (b_T - a_T)[:, None, None]
        with np.errstate(invalid="ignore"):
            tangent = np.where(np.isfinite(FB), FB + FS * w, -np.inf).max(axis=2) @ self.Omega
        const = np.sort(self.const)
        starts = np.searchsorted(const, b_T, "right") > np.searchsorted(const, a_T, "right")
        with_tangent = np.minimum(ub, np.maximum(self.score(B[:-1], a_T), self.score(tangent, b_T)))
        return np.where(np.isfinite(B[:-1]) & ~starts, with_tangent, ub)

    def run(self, deadline_at: float | None, refine: int = 0,
            prove: bool = True) -> tuple[Point | None, float, int]:
        """Best point, upper bound (proven if `prove`), evaluations; None when no T is feasible.
        `refine` extra T's are sampled where the bound still allows a better plan (plans are
        steps in T)."""
        if self.t_min > self.t_max:
            return None, -np.inf, 0
        Ts = np.unique(np.concatenate([np.linspace(self.t_min, self.t_max, INITIAL_GRID),
                                       np.geomspace(max(self.t_min, 1e-12), self.t_max, INITIAL_GRID)]))
        Ts = Ts[(Ts >= self.t_min) & (Ts <= self.t_max)]
        pts = sorted(self.evaluate(Ts), key=lambda pt: pt.T)
        best = max(pts, key=lambda pt: pt.objective)
        rounds = 0
        while True:
            lb = best.objective
            tol = TARGET_GAP * max(abs(lb), 1e-12)
            # no split can push the bound below the best bound at a single T (the LP's own gap)
            bound = max(self.score(pt.bound, pt.T) for pt in pts)
            floor = max(lb + tol, bound)
            slack = max(tol / 2, 0.5 * (floor - lb))  # the gap at single T's remains anyway
            split, open_ = [], []
            for a, b, ub in zip(pts, pts[1:], self.interval_bounds(pts), strict=False):
                ub = float(ub)
                bound = max(bound, ub)
                if ub <= lb + tol or b.T - a.T <= 1e-12 * max(1.0, b.T):
                    continue
                if ub > floor + slack and prove:
                    split.append((a.T + b.T) / 2)
                else:  # may still hold a better plan: sample it while the refine budget lasts
                    open_.append((ub, (a.T + b.T) / 2))
            open_.sort(reverse=True)
            extra = [t for _, t in open_[:min(refine, REFINE_BATCH)]]
            refine -= len(extra)
            rounds += 1
            if (not split and not extra) or rounds >= MAX_ROUNDS or (
                    deadline_at and time.perf_counter() > deadline_at):
                return best, bound, self.evaluations
            new = self.evaluate(np.array(split + extra))
            pts = sorted(pts + new, key=lambda pt: pt.T)
            cand = max(new, key=lambda pt: pt.objective)
            if cand.objective > best.objective:
                best = cand


def _subset(rows: Rows, mask: np.ndarray) -> Rows:
    return Rows(rows.shape1, rows.idx1[mask], rows.scale1[mask], rows.budget1[mask],
                rows.shape2, rows.idx2[mask], rows.scale2[mask], rows.budget2[mask])


# ---------------------------------------------------------------- driver
def _hardware(problem: Problem) -> tuple[list[Server], np.ndarray, np.ndarray]:
    """(D1): hardware group per class, representative servers and Omega_h."""
    index: dict[tuple, int] = {}
    of_class, reps, omega = [], [], []
    for k, cls in enumerate(problem.classes):
        key = hardware_key(cls.rep)
        if key not in index:
            index[key] = len(reps)
            reps.append(cls.rep)
            omega.append(0.0)
        of_class.append(index[key])
        omega[index[key]] += problem.omega[k]
    return reps, np.array(of_class, dtype=np.int64), np.array(omega)


def _choices(variants: list[Variant], pairs: Pairs, point: Point, of_class: np.ndarray) -> list[Choice]:
    """One Choice object per hardware group, shared by its classes (evaluate costs it once)."""
    per_group = [Choice(int(pairs.bits[j]), int(pairs.batch[j]),
                        variants[point.variant[h]].ranks_for(point.units[h]),
                        float(pairs.density[j]), str(pairs.precision[j]))
                 for h, j in enumerate(point.pair)]
    return [per_group[h] for h in of_class]


def solve_decomposed(problem: Problem,
                     time_limit: float | None = None) -> tuple[list[Choice] | None, SolverReport]:
    """(D1)-(D6), and (D9) where the selection binds: choices per class and an honest report
    (status, proven gap, time)."""
    if not problem.restricted:
        return _solve_decomposed(problem, time_limit)
    start = time.perf_counter()
    choices, report = _solve_decomposed(problem.relaxed(), time_limit)
    if choices is not None and problem.selection_holds(choices):
        return choices, report
    left = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - start))
    return _solve_decomposed(problem, left)


def _solve_decomposed(problem: Problem,
                      time_limit: float | None) -> tuple[list[Choice] | None, SolverReport]:
    start = time.perf_counter()
    deadline_at = None if time_limit is None else start + time_limit
    tables = tables_for(problem)
    reps, of_class, Omega = _hardware(problem)
    pairs = build_pairs(problem, tables, reps)

    def report(status: str, gap: float | None, objective: float | None) -> SolverReport:
        return SolverReport(solver=SOLVER_NAME, status=status, gap=gap, method="decomposed",
                            solve_time_s=round(time.perf_counter() - start, 3), time_limit_s=time_limit,
                            objective=objective)

    if len(pairs.h) == 0 or len(set(pairs.h.tolist())) < len(reps):
        return None, report("infeasible", None, None)
    search = TimeSearch(problem, tables, pairs, len(reps), Omega)
    stack = problem.rule.broadcasts_stack
    point, bound, _ = search.run(deadline_at, FLORA_REFINE if stack else REFINE_POINTS)
    if point is None or not np.isfinite(point.objective):
        return None, report("infeasible", None, None)
    choices = _choices(variants_for(problem), pairs, point, of_class)
    if stack:  # (D6); the D = 0 search above is a relaxation: its bound stands
        choices = _flora(problem, tables, pairs, reps, Omega, of_class, choices, deadline_at)
        if choices is None:
            return None, report("infeasible" if deadline_at is None or time.perf_counter() < deadline_at
                                else "not_solved", None, None)
    ev = evaluate(problem, choices)
    if not is_feasible(problem, choices, ev):
        return None, report("not_solved", None, None)
    gap = max(0.0, bound - ev.objective) / max(abs(bound), 1e-12)
    return choices, report("optimal" if gap <= OPTIMAL_GAP else "feasible", gap, ev.objective)


def _flora(problem: Problem, tables: Tables, pairs: Pairs, reps: list[Server], Omega: np.ndarray,
           of_class: np.ndarray, first: list[Choice], deadline_at: float | None) -> list[Choice] | None:
    """(D6): prices on the stack and a fixed point on its size; the best truly-evaluated plan.

    A byte of stack costs every server download time; at price mu (objective per byte) group h
    stops adding adapter parameters whose gain per parameter is below 4 mu c_h / (Omega_h f_j)
    (the time-ordered LP curve gives where). mu = 0 and multiples of the price seen by the
    slowest downlink are tried, each with a few fixed-point steps on the assumed stack D."""
    by_name = {m.name: m for m in problem.matrices}

    def stack_mbit(choices: list[Choice]) -> float:
        own = {id(ch): sum(problem.cost.wire_bytes(by_name[n], r) for n, r in ch.ranks.items())
               for ch in choices}
        pairs_ = zip(problem.classes, choices, strict=True)
        return sum(cls.count * own[id(ch)] for cls, ch in pairs_) * 8 / 1e6

    counts = np.zeros(len(reps))
    np.add.at(counts, of_class, [cls.count for cls in problem.classes])
    cum_cost, cum_gain, _ = tables.curve(pairs.time_shape)
    ratio = np.diff(cum_gain) / np.maximum(np.diff(cum_cost), 1e-300)  # gain per parameter, falling
    mu0 = time_price(problem, first) * 8 / (pairs.down_mbps.min() * 1e6)

    best, best_obj, current = None, -np.inf, first
    for mu in [0.0] + [mu0 * 2.0 ** k for k in range(-3, 3)]:
        rho = WIRE_BYTES_PER_VALUE * mu * counts[pairs.h] / (Omega[pairs.h] * pairs.f)
        caps = None if mu == 0 else cum_cost[np.searchsorted(-ratio, -rho, side="left")]
        assumed = None
        for _ in range(FLORA_ITERATIONS):
            ev = evaluate(problem, current)
            actual = stack_mbit(current)
            if is_feasible(problem, current, ev) and ev.objective > best_obj:
                best, best_obj = current, ev.objective
            if (assumed is not None and abs(actual - assumed) <= 1e-9 * max(actual, 1.0)) or (
                    deadline_at and time.perf_counter() > deadline_at):
                break  # the plan fits what it assumed: further steps repeat it
            assumed = actual
            search = TimeSearch(problem, tables, pairs, len(reps), Omega, assumed, caps)
            point, _, _ = search.run(deadline_at, FLORA_REFINE, prove=False)
            if point is None or not np.isfinite(point.objective):
                break
            current = _choices(variants_for(problem), pairs, point, of_class)
        if best is not None:
            current = best
    return best


def time_price(problem: Problem, choices: list[Choice]) -> float:
    """What a second of round time is worth in quality: lambda / T_ref (weighted); under the rate
    objective the plan's own rate, the price at which Dinkelbach's F(lambda) = max q - lambda T
    has the rate optimum as its solution."""
    o = problem.profile.objective
    if o.kind == "rate":
        return evaluate(problem, choices).objective
    return o.time_weight / problem.t_ref


def solve_baseline_decomposed(problem: Problem) -> list[Choice] | None:
    """(D7): one configuration and one rank pattern for every server, quality only (under spread
    the relaxed answer where it obeys the selection, as in solve_decomposed)."""
    if problem.restricted:
        choices = _baseline(problem.relaxed())
        if choices is not None and problem.selection_allows(choices[0].ranks):
            return choices
    return _baseline(problem)


def _baseline(problem: Problem) -> list[Choice] | None:
    p, cost = problem.profile, problem.cost
    tables, variants = tables_for(problem), variants_for(problem)
    reps = list({hardware_key(c.rep): c.rep for c in problem.classes}.values())
    common_bits = [q for q in p.candidates.bits if all(q in p.allowed_bits(r) for r in reps)]
    unit, grp_rep = tables.unit, [g.rep for g in tables.groups]
    best, best_value = None, -np.inf
    for q in common_bits:
        for b in p.candidates.batch_sizes:
            budgets = {}
            for r in reps:
                budgets[r.device] = min(budgets.get(r.device, np.inf),
                                        r.memory_gib - problem.fixed_memory_gib(q, b, r.device))
            if min(budgets.values()) < 0:
                continue
            shapes = [np.array([cost.lora_memory_gib(m, unit, b, d) for m in grp_rep]) for d in budgets]
            rows = Rows(np.array(shapes[:1]), np.zeros(1, dtype=np.int64), np.ones(1),
                        np.array([list(budgets.values())[0] * (1 - 1e-9)]),
                        np.array(shapes[-1:]), np.zeros(1, dtype=np.int64), np.ones(1),
                        np.array([list(budgets.values())[-1] * (1 - 1e-9)]))
            v, _, R, variant, _, _ = solve_variants(variants, rows)
            value = problem.config_factor(q, b, problem.densest, problem.widest) * v[0]
            if value > best_value + 1e-15:
                best = Choice(q, b, variants[variant[0]].ranks_for(R[0]), problem.densest,
                              problem.widest)
                best_value = value
    return None if best is None else [best] * len(problem.classes)
