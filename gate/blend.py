"""Gradient-free search for a faint full-image blend trigger of one target class, beside B3D's patch search.

B3D's trigger is a Bernoulli patch mask with a pattern. A blended backdoor (x' = (1-a) x + a p over the whole
image, a ~ 0.1-0.2) or an additive sinusoid (SIG) has no small patch: its patch trigger is large, and the
patch search cannot tell it from a natural class. The blend search looks for that kind of trigger instead:
one amplitude a = g(theta_a) (a scalar; the mask handed to the stamping code is the constant a over the
whole H x W) and a full-image pattern p = g(theta_p + sigma*eps) (H, W, C), g(z) = (tanh z + 1)/2, stamped
with the same formula (1-a) x + a p. NES estimates of the gradient of the smoothed objective

    F(theta_a, theta_p) = E[CE(c | (1-a_j) x + a_j p_j)] + lambda |m|_1,   |m|_1 = a H W (a = g(theta_a))

drive Adam on (theta_a, theta_p). The penalty is the constant mask's L1 (counted in searched cells on a coarse
grid, as the patch search counts it), so lambda and its schedule
(:class:`gate.search.SearchParams`: lambda_init/up/down, patience, early stop) mean what they mean for the
patch search; with ``exact_penalty`` its gradient is taken in closed form at the mean amplitude. Only the
early-stop patience is the blend search's own (``BlendParams.early_stop_patience``, 80): one amplitude
plateaus longer than a patch mask does.

Same ask/tell shape and candidate count as :class:`gate.search.TriggerSearch` (so both modes share a
scan's arrays, model calls and query accounting); the last candidate is the current trigger (the mean
amplitude g(theta_a) with the mean pattern g(theta_p)), whose success drives the lambda schedule and the
choice of the best trigger: the smallest amplitude whose mean trigger reached ``success_threshold``.

Layouts (``SearchParams.sampling``): ``paired`` and ``joint`` (k samples): k/2 amplitude samples
a_j = g(theta_a + s_a * delta_j) (s_a: ``blend.sigma``), each stamped with pattern noise +eps_j and -eps_j. The pattern
estimate uses the pair difference (the amplitude is the same in both: its noise cancels exactly), the
amplitude estimate the pair mean (the pattern noise cancels to first order). With one scalar to estimate
there is nothing for ``joint`` to gain over this, so both mean it. ``separate`` (2k samples, the paper's
Eq. 5/6 split): k amplitude samples with the mean pattern, then k pattern samples with the mean amplitude.
With ``antithetic`` the amplitude noises come in mirrored couples (delta, -delta); ``baseline`` subtracts
from each amplitude sample's loss the mean of the others outside its couple (unbiased).

The per-class statistic is the amplitude of the best trigger (1.0 when none worked: a trigger that is the
whole pattern, never the suspicious end); :func:`blend_outliers` applies the scan's outlier rule to it, with a
calibration of its own (the ``blend`` section's alpha, scale floor and population test).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gate.kernels import noisy_patterns
from gate.outliers import OutlierRule, Outliers, find_outliers
from gate.search import Adam, SearchParams, TriggerSearch, g
from gate.settings import Settings, integer, number, setting

AMPLITUDE_FLOOR = 1.0 / 255  # the outlier rule takes logs of max(a, this): one grey level of an 8-bit image


@dataclass(frozen=True)
class BlendParams(Settings):
    """What the blend search needs beyond :class:`gate.search.SearchParams` (policy section ``blend``)."""

    SECTION = "blend"
    FLAG_PREFIX = "blend-"

    init: float = setting(1.0, number(), "initial amplitude logit (g(1) = 0.88: the first trigger is mostly "
                          "pattern)")
    sigma: float = setting(0.2, number(0, lo_open=True), "noise scale on the amplitude logit")
    early_stop_patience: int = setting(80, integer(1), "stop a class's blend search after this many steps without "
                                       "improvement (its one amplitude plateaus longer than a patch mask does: "
                                       "the patch search's 40 stopped a planted blend before it formed)")
    # The outlier rule on the amplitudes: the policy's ``outliers.method`` with this calibration of its own (blend
    # amplitudes are not L1 norms: their natural spread and their outliers are other numbers). Fitted by
    # ``python -m bench.verdicts --blend-records ...`` as the patch rule is: the population on the clean models'
    # classes, scale_floor / population_weight / alpha on the gate's decision (either mode's flags) across folds.
    # The defaults are that fit on all 40 wide-zoo models with a blend-mode scan (31 clean, 9 counted backdoors:
    # 6 blended, 3 SIG; 2026-12-07, bench/RESULTS.md). Few backdoors: the fold fits range over alphas 1.4e-3-0.08.
    alpha: float = setting(0.01, number(0, 1, lo_open=True, hi_open=True),
                           "calibrated: flag a class whose per-model blend p-value is at most this")
    scale_floor: float = setting(0.8, number(0), "calibrated: least spread of the classes' log amplitudes")
    population_weight: float = setting(0.85, number(0, 1),
                                       "calibrated: weight of the population test (a class's log amplitude "
                                       "against the natural classes of clean models) beside the within-model test")
    population_mean: float = setting(-1.09, number(),
                                     "calibrated: median log amplitude of the natural classes of clean models")
    population_scale: float = setting(0.28, number(0, lo_open=True),
                                      "calibrated: their robust spread (1.4826 MAD, log units)")


@dataclass
class BlendState:
    theta_a: np.ndarray  # (1,) amplitude logit
    theta_p: np.ndarray  # (H, W, C)
    adam_a: Adam
    adam_p: Adam
    rng: np.random.Generator
    delta: np.ndarray  # (n_a,) normals for the amplitude samples
    groups: np.ndarray  # (n_a,) couple of each amplitude sample (mirrored pairs share one)
    amps: np.ndarray  # (n_a,) the sampled amplitudes
    eps: np.ndarray  # (k, H, W, C) normals for the pattern samples
    masks: np.ndarray  # (n, H, W) candidate masks (constant over the image)
    patterns: np.ndarray  # (n, H, W, C) candidate patterns
    pixels: int  # H * W: the constant mask's L1 is a * pixels
    # the lambda schedule's book-keeping, named as in gate.search.SearchState (TriggerSearch._schedule runs it)
    lam: float = 0.0
    lambda_active: bool = False
    raised: bool = False
    lowered: bool = False
    up_count: int = 0
    down_count: int = 0
    step: int = 0
    best_l1: float = float("inf")  # best_amplitude * pixels
    best_amplitude: float | None = None  # smallest amplitude whose mean trigger reached the threshold
    best_pattern: np.ndarray | None = None
    steps_since_improve: int = 0
    improve_ref: float = float("inf")
    activation_l1: float = float("inf")
    done: bool = False
    status: str = "running"
    last_success: float = 0.0
    best_success: float = 0.0
    flat_steps: int = 0

    @property
    def amplitude(self) -> float:
        return float(g(self.theta_a[0]))

    @property
    def mean_pattern(self) -> np.ndarray:
        return g(self.theta_p)

    @property
    def result_amplitude(self) -> float:
        """The class's statistic: the best working amplitude, 1.0 when no blend trigger worked."""
        return 1.0 if self.best_amplitude is None else self.best_amplitude

    @property
    def result_l1(self) -> float:
        """The L1 :meth:`result_trigger` reports, without building its arrays."""
        return self.best_l1 if self.best_amplitude is not None else float(self.pixels)

    def result_trigger(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, pattern, L1) as :meth:`gate.search.SearchState.result_trigger`: the mask is the constant
        amplitude; without a working trigger the current pattern at amplitude 1 (the whole image)."""
        h, w = self.masks.shape[1:]
        if self.best_amplitude is not None:
            return np.full((h, w), self.best_amplitude, np.float32), self.best_pattern, self.best_l1
        return np.ones((h, w), np.float32), self.mean_pattern.astype(np.float32), float(self.pixels)


def couples(n: int, antithetic: bool) -> np.ndarray:
    """Couple id of each of n amplitude samples: (i, i + n//2) mirrored when ``antithetic``, an odd last alone."""
    if not antithetic:
        return np.arange(n)
    m = n // 2
    return np.concatenate([np.arange(m), np.arange(m), np.arange(m, m + n % 2)])


def leave_group_out(f: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-sample baseline: the mean of the samples outside its group (0 when there are none)."""
    sums = np.bincount(groups, weights=f)
    counts = np.bincount(groups)
    rest = len(f) - counts[groups]
    return np.where(rest > 0, (f.sum() - sums[groups]) / np.maximum(rest, 1), 0.0)


class BlendSearch(TriggerSearch):
    """NES blend-trigger search for one image shape; stateless itself, all state lives in :class:`BlendState`.

    Shares :class:`TriggerSearch`'s lambda schedule, early stop, pattern baseline and ``stop``.
    """

    def __init__(self, image_shape: tuple[int, int, int], params: SearchParams | None = None,
                 blend: BlendParams | None = None) -> None:
        self.blend = blend or BlendParams()
        params = replace(params or SearchParams(), early_stop_patience=self.blend.early_stop_patience)
        super().__init__(image_shape, params)

    @property
    def amplitude_samples(self) -> int:
        p = self.params
        return p.k if p.sampling == "separate" else p.k // 2

    def init(self, rng: np.random.Generator, masks: np.ndarray | None = None,
             patterns: np.ndarray | None = None) -> BlendState:
        h, w, c = self.shape
        p = self.params
        n = p.candidates
        n_a = self.amplitude_samples
        theta_a = np.full(1, self.blend.init, dtype=np.float64)
        theta_p = np.zeros((h, w, c), dtype=np.float64)
        return BlendState(
            theta_a=theta_a,
            theta_p=theta_p,
            adam_a=Adam(p.lr, p.adam_beta1, p.adam_beta2, np.zeros_like(theta_a), np.zeros_like(theta_a)),
            adam_p=Adam(p.lr, p.adam_beta1, p.adam_beta2, np.zeros_like(theta_p), np.zeros_like(theta_p)),
            rng=rng,
            delta=np.empty(n_a, dtype=np.float64),
            groups=couples(n_a, p.antithetic),
            amps=np.empty(n_a, dtype=np.float32),
            eps=np.empty((p.k, h, w, c), dtype=np.float32),
            masks=np.empty((n, h, w), dtype=np.float32) if masks is None else masks,
            patterns=np.empty((n, h, w, c), dtype=np.float32) if patterns is None else patterns,
            pixels=self.grid.pixels,  # the input's pixels (the pattern may live on a coarser grid)
        )

    # ------------------------------------------------------------------ ask
    def ask(self, state: BlendState) -> tuple[np.ndarray, np.ndarray]:
        """Fill and return (masks, patterns) for this step's candidates; the last is the current trigger."""
        p = self.params
        k = p.k
        rng = state.rng
        mean_pattern = state.mean_pattern
        state.masks[-1] = state.amplitude
        state.patterns[-1] = mean_pattern
        n_a = len(state.delta)
        m = n_a // 2 if p.antithetic else 0
        state.delta[m:] = rng.standard_normal(n_a - m)
        if m:
            state.delta[:m] = -state.delta[m:2 * m]
        np.copyto(state.amps, g(state.theta_a[0] + self.blend.sigma * state.delta))
        theta_p = state.theta_p.astype(np.float32)
        sigma = np.float32(p.sigma)
        if p.sampling == "separate":  # k amplitude samples with the mean pattern, then k pattern samples
            half = k // 2 if p.antithetic else k
            rng.standard_normal(out=state.eps[:half], dtype=np.float32)
            if p.antithetic:
                np.negative(state.eps[:half], out=state.eps[half:])
            state.masks[:k] = state.amps[:, None, None]
            state.patterns[:k] = mean_pattern
            state.masks[k:2 * k] = state.amplitude
            noisy_patterns(theta_p, state.eps, sigma, state.patterns[k:2 * k])
            return state.masks, state.patterns
        h = k // 2  # h amplitudes, each stamped with pattern noise +eps_j and -eps_j
        rng.standard_normal(out=state.eps[:h], dtype=np.float32)
        np.negative(state.eps[:h], out=state.eps[h:])
        state.masks[:h] = state.amps[:, None, None]
        state.masks[h:k] = state.masks[:h]
        noisy_patterns(theta_p, state.eps, sigma, state.patterns[:k])
        return state.masks, state.patterns

    # ------------------------------------------------------------------ tell
    def tell(self, state: BlendState, ce: np.ndarray, success: float) -> None:
        """Update from the candidates' mean cross-entropy ``ce`` (n,) and the current trigger's success."""
        p = self.params
        a = state.amplitude
        state.last_success = float(success)
        state.best_success = max(state.best_success, float(success))
        if success >= p.success_threshold and (state.best_amplitude is None or a < state.best_amplitude):
            state.best_amplitude = a
            state.best_l1 = a * state.pixels
            if state.best_pattern is None:
                state.best_pattern = np.empty(state.theta_p.shape, np.float32)
            state.best_pattern[...] = state.mean_pattern

        self._advance(state, ce, success, state.theta_a, state.adam_a, found=state.best_amplitude is not None)

    def gradients(self, state: BlendState, ce: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NES estimates of d/d(theta_a) (shape (1,)) and d/d(theta_p) of F from the last ask's losses ``ce``.

        Amplitude: 1/(n s_a) sum_j (F_j - b_j) delta_j over the amplitude samples (F_j: the pair mean for
        ``paired``), b_j the leave-couple-out baseline. Pattern: the pair differences, or for ``separate``
        1/(k sigma) sum (f_j - b_j) eps_j. The lambda term: closed form with ``exact_penalty``
        (lambda H W g'(theta_a), g' = 2 g (1 - g)), else lambda a_j H W added to each amplitude sample's loss.
        """
        p = self.params
        k = p.k
        ce = np.asarray(ce[:p.candidates - 1], dtype=np.float64)
        if p.sampling == "separate":
            f_a = ce[:k]
            f_p = ce[k:2 * k]
            if p.baseline:
                f_p = f_p - self._baseline(f_p)
            grad_p = (f_p @ state.eps.reshape(k, -1)) / (k * p.sigma)
        else:
            h = k // 2
            f_a = 0.5 * (ce[:h] + ce[h:k])
            grad_p = ((ce[:h] - ce[h:k]) @ state.eps[:h].reshape(h, -1)) / (2 * h * p.sigma)
        n = len(f_a)
        weight = state.lam * state.pixels / self.grid.cell_area  # lambda per searched cell, as the patch search's
        if not p.exact_penalty:
            f_a = f_a + weight * state.amps.astype(np.float64)
        if p.baseline:
            f_a = f_a - leave_group_out(f_a, state.groups)
        grad_a = np.array([f_a @ state.delta / (n * self.blend.sigma)])
        if p.exact_penalty:
            a = state.amplitude
            grad_a += weight * 2.0 * a * (1.0 - a)
        return grad_a, grad_p.reshape(state.theta_p.shape)

    def explain(self, state: BlendState) -> str:
        """Why a class's blend search did not find a working trigger ("" when it did)."""
        if state.best_amplitude is not None:
            return ""
        why = (f"no blend trigger reached {self.params.success_threshold:.0%} success in {state.step} steps (best "
               f"{state.best_success:.0%} of a step's images)")
        if state.flat_steps:
            why += (f"; in {state.flat_steps} steps every sample had the same loss: the model gave the class a "
                    "probability of exactly 0 however the trigger varied (saturated outputs, no signal)")
        return why


# the settings BlendParams shares with gate.outliers.OutlierRule: the blend amplitudes' own calibration
CALIBRATION = ("alpha", "scale_floor", "population_weight", "population_mean", "population_scale")


def blend_rule(rule: OutlierRule, params: BlendParams) -> OutlierRule:
    """The outlier rule for blend amplitudes: the policy's rule (its method, the MAD rule's settings) with the
    blend section's calibration in place of the patch L1 norms' (:class:`BlendParams`)."""
    return replace(rule, **{name: getattr(params, name) for name in CALIBRATION})


def blend_outliers(amplitudes, rule: OutlierRule | None = None, params: BlendParams | None = None) -> Outliers:
    """The outlier rule on the classes' blend amplitudes, which play the part of the L1 norms (small is
    suspicious), calibrated by ``params`` (:func:`blend_rule`); the calibrated rule's log is floored at
    :data:`AMPLITUDE_FLOOR` instead of half a pixel. An amplitude is already a fraction of the image, so the
    population test compares log a itself (one "pixel") with the natural classes of clean models."""
    return find_outliers(amplitudes, blend_rule(rule or OutlierRule(), params or BlendParams()),
                         floor=AMPLITUDE_FLOOR, pixels=1)


def blend_summary(params: BlendParams, out: Outliers) -> dict:
    """What a report keeps of the blend mode (``ScanResult.blend``): its settings and the rule's outcome."""
    summary = {**params.to_dict(), "median_amplitude": out.median, "mad": out.mad}
    if out.method == "calibrated":
        summary.update(model_p_value=out.model_p_value, backdoor_score=out.backdoor_score)
    return summary
