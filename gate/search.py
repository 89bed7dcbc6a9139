"""Gradient-free trigger search for one target class (B3D, Dong et al. ICCV 2021, Algorithm 1).

The search distribution is m ~ Bernoulli(g(theta_m)) for the H x W mask and p = g(theta_p + sigma*eps)
for the H x W x C pattern, g(z) = (tanh z + 1)/2. NES estimates of the gradient of the smoothed objective
F(m, p) = CE(c | (1-m)x + m p) + lambda |m|_1 (paper Eq. 5, 6) drive Adam on (theta_m, theta_p), and
lambda follows Neural Cleanse's schedule. On a coarse grid (:mod:`gate.grid`, inputs larger than 32x32) |m|_1
counts searched cells, not pixels: each cell's Bernoulli is one decision whatever its area, so the same
lambda_init weighs a cell as it weighs a pixel of a 32x32 input (counted in pixels, a 128x128 input's 4x4-pixel
cells were penalised 16 times harder and its BadNets target's search stopped at a third of the image).

The interface is ask/tell, evaluation is the caller's business::

    search = TriggerSearch(shape, params)
    state = search.init(rng)
    while not state.done:
        cand = search.ask(state)              # masks (n,H,W), patterns (n,H,W,C)
        ce, hits = evaluate(cand)             # caller stamps and queries the model
        search.tell(state, ce, hits)

``ask`` returns the k search samples followed by one more candidate, the current trigger: the binary
mask 1[g(theta_m) >= 0.5] with the mean pattern g(theta_p). Its attack success on ``eval_size`` clean
images drives the lambda schedule and the choice of the best trigger, exactly as the current trigger's success
does in Neural Cleanse; the L1 recorded with it is the soft mask's, sum g(theta_m) = E|m|_1 (what the
outlier rule uses, as in the paper).
With ``sampling="separate"`` (the paper's Eq. 5/6 exactly) mask samples use the mean pattern g(theta_p)
and pattern samples use the soft mask g(theta_m): 2k + 1 candidates.
``"joint"`` draws (m_j, eps_j) together and uses each evaluation for both estimates: an unbiased estimate
of the gradient of the same smoothed objective at half the queries, but the mask noise swamps the
pattern estimate. ``"paired"`` (default) draws k/2 masks and stamps each with +eps_j and -eps_j: the
pattern estimate uses the pair difference (the mask noise cancels exactly), the mask estimate the pair
mean (the pattern noise cancels to first order). Both stay unbiased; k evaluations per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gate.grid import Grid
from gate.kernels import bernoulli_masks, noisy_patterns, shown_noise, shown_patterns, standard_normals
from gate.settings import Bad, Settings, boolean, choice, even_integer, integer, number, setting

SAMPLINGS = ("paired", "joint", "separate")
FLAT_FLOOR = -3.0  # flat-loss shrinking stops at this mask logit: g(-3) = 0.25 % of the image


@dataclass(frozen=True)
class SearchParams(Settings):
    """The NES trigger search's settings (policy section ``search``)."""

    SECTION = "search"

    k: int = setting(50, even_integer(2), "search samples per NES step")
    sigma: float = setting(0.3, number(0, lo_open=True), "pattern noise scale")
    lr: float = setting(0.1, number(0, lo_open=True), "Adam learning rate")
    batch_size: int = setting(2, integer(1), "clean images each candidate is stamped on per step")
    eval_size: int = setting(16, integer(1), "clean images the current trigger is checked on per step (lambda "
                             "schedule)")
    max_steps: int = setting(800, integer(1), "NES steps per class at most")
    sampling: str = setting("paired", choice(*SAMPLINGS),
                            " | ".join(SAMPLINGS) + " (separate: the paper's Eq. 5/6, 2k evaluations)")
    antithetic: bool = setting(True, boolean, "mirrored samples: (u, 1-u) for masks, (eps, -eps) for patterns")
    baseline: bool = setting(True, boolean, "subtract a leave-one-out mean fitness (variance reduction, unbiased)")
    mask_pattern_noise: bool = setting(True, boolean, "pattern estimate only from pixels the sampled mask shows")
    exact_penalty: bool = setting(True, boolean, "closed-form gradient of the lambda |m| term")
    lambda_init: float = setting(1e-2, number(0, lo_open=True), "first lambda once a trigger works, per searched "
                                 "cell: the penalty is lambda * (mask L1 in pixels) / (pixels per cell), so a "
                                 "coarse grid weighs each cell as a pixel of a 32x32 input")
    lambda_up: float = setting(1.5, number(0, lo_open=True), "lambda multiplier while triggers work")
    lambda_down: float = setting(1.5 ** 1.5, number(0, lo_open=True), "lambda divisor while they do not")
    patience: int = setting(5, integer(1), "steps between lambda schedule changes")
    success_threshold: float = setting(0.99, number(0, 1, lo_open=True), "attack success a trigger must reach")
    early_stop_patience: int = setting(40, integer(1), "stop after this many steps without improvement")
    early_stop_tol: float = setting(0.01, number(0), "an improvement is a fall of the best L1 by this fraction")
    early_stop_min_shrink: float = setting(0.5, number(0, 1),
                                           "no early stop before the trigger lost this fraction of its first L1")
    mask_init: float = setting(1.0, number(), "initial mask logit (g(1) = 0.88 of the image)")
    flat_shrink: float = setting(0.5, number(0), "when every sample's loss is the same (the model gave the class "
                                 "a probability of exactly 0), lower the mask logits by this: show more of the "
                                 "image, so the search gets a signal (0: off)")
    grid_cells: int = setting(32, integer(0), "inputs larger than this many pixels a side are searched on a grid "
                              "of at most this many cells a side, each cell covering a square of pixels "
                              "(gate.grid; 0: every pixel; a 32x32 input is searched pixel by pixel)")
    adam_beta1: float = setting(0.9, number(0, 1, hi_open=True), "Adam first-moment decay")
    adam_beta2: float = setting(0.999, number(0, 1, hi_open=True), "Adam second-moment decay")

    def validate(self) -> None:
        if self.sampling == "paired" and self.k < 4:
            raise Bad("paired sampling needs k >= 4")

    @classmethod
    def paper(cls) -> SearchParams:
        """The paper's settings (Dong et al. 2021): k=50, minibatch 32, Eq. 5/6 evaluated separately."""
        return cls(k=50, batch_size=32, eval_size=32, sigma=0.1, lr=0.05, max_steps=300, early_stop_patience=25,
                   early_stop_min_shrink=0.0, mask_init=0.0, lambda_init=1e-3, sampling="separate", antithetic=False,
                   exact_penalty=False, mask_pattern_noise=False)

    @property
    def queries_per_step(self) -> int:
        return (self.candidates - 1) * self.batch_size + self.eval_size

    @property
    def candidates(self) -> int:
        """Candidates per ask: the samples, then the current trigger (whose hits measure success)."""
        return (2 * self.k if self.sampling == "separate" else self.k) + 1



def g(z: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(z) + 1.0)


@dataclass
class Adam:
    lr: float
    beta1: float
    beta2: float
    m: np.ndarray
    v: np.ndarray
    t: int = 0
    eps: float = 1e-8

    def step(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """In place: theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)."""
        self.t += 1
        self.m *= self.beta1
        self.m += (1 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1 ** self.t)
        v_hat = self.v / (1 - self.beta2 ** self.t)
        theta -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


@dataclass
class SearchState:
    theta_m: np.ndarray  # (H, W)
    theta_p: np.ndarray  # (H, W, C)
    adam_m: Adam
    adam_p: Adam
    rng: np.random.Generator
    # preallocated per-step buffers
    u: np.ndarray  # (k, H, W) uniforms for the mask samples
    eps: np.ndarray  # (k, H, W, C) normals for the pattern samples (paired: the first k/2, 0 where hidden)
    z: np.ndarray  # flat scratch (2 * k/2 * H*W*C): the shown pixels' normals, then the paired patterns' args
    masks: np.ndarray  # (n, H, W) candidate masks
    patterns: np.ndarray  # (n, H, W, C) candidate patterns
    lam: float = 0.0
    lambda_active: bool = False
    raised: bool = False  # lambda has been raised at least once
    lowered: bool = False  # ... and lowered at least once
    up_count: int = 0
    down_count: int = 0
    step: int = 0
    best_l1: float = float("inf")
    best_mask: np.ndarray | None = None  # soft mask of the best successful mean trigger
    best_pattern: np.ndarray | None = None
    steps_since_improve: int = 0
    improve_ref: float = float("inf")
    activation_l1: float = float("inf")  # L1 of the first successful trigger
    done: bool = False
    status: str = "running"
    last_success: float = 0.0
    best_success: float = 0.0  # the current trigger's best success on a step's images
    flat_steps: int = 0  # steps whose samples all had the same loss: no signal, the mask was shrunk instead
    grid: Grid | None = None  # what the mask and pattern live on (set by init; gate.grid)

    @property
    def mask_prob(self) -> np.ndarray:
        return g(self.theta_m)

    @property
    def mean_pattern(self) -> np.ndarray:
        return g(self.theta_p)

    @property
    def result_l1(self) -> float:
        """The L1 :meth:`result_trigger` reports, without building its arrays (asked of every class each round)."""
        return self.best_l1 if self.best_mask is not None else float(self.grid.pixels)

    def result_trigger(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(soft mask, pattern, L1) of the best successful trigger, else the current mean trigger with the L1
        of the whole image: no working trigger was found, so none is known to be smaller (a search that
        shrank its mask for want of a signal must not look like the smallest trigger)."""
        if self.best_mask is not None:
            return self.best_mask, self.best_pattern, self.best_l1
        m = self.mask_prob.astype(np.float32)
        return m, self.mean_pattern.astype(np.float32), float(self.grid.pixels)


class TriggerSearch:
    """NES trigger search for one image shape; stateless itself, all state lives in :class:`SearchState`.

    The mask and pattern live on :attr:`grid` (:mod:`gate.grid`; the pixels themselves for inputs of at most
    ``params.grid_cells`` a side): :attr:`shape` is (cell rows, cell columns, channels), every L1 is in pixels.
    """

    def __init__(self, image_shape: tuple[int, int, int], params: SearchParams | None = None) -> None:
        self.params = params or SearchParams()
        h, w, c = image_shape
        self.grid = Grid.for_image(h, w, self.params.grid_cells)
        self.shape = (*self.grid.shape, c)

    def init(self, rng: np.random.Generator, masks: np.ndarray | None = None,
             patterns: np.ndarray | None = None) -> SearchState:
        """A fresh state. ``masks`` (n, H, W) / ``patterns`` (n, H, W, C) float32: where ``ask`` writes the
        candidates (e.g. this class's slice of a scan-wide array); allocated when not given."""
        h, w, c = self.shape
        p = self.params
        n = p.candidates
        theta_m = np.full((h, w), p.mask_init, dtype=np.float64)
        theta_p = np.zeros((h, w, c), dtype=np.float64)
        return SearchState(
            theta_m=theta_m,
            theta_p=theta_p,
            adam_m=Adam(p.lr, p.adam_beta1, p.adam_beta2, np.zeros_like(theta_m), np.zeros_like(theta_m)),
            adam_p=Adam(p.lr, p.adam_beta1, p.adam_beta2, np.zeros_like(theta_p), np.zeros_like(theta_p)),
            rng=rng,
            u=np.empty((p.k, h, w), dtype=np.float32),
            eps=np.empty((p.k, h, w, c), dtype=np.float32),
            z=np.empty(2 * (p.k // 2) * h * w * c, dtype=np.float32),
            masks=np.empty((n, h, w), dtype=np.float32) if masks is None else masks,
            patterns=np.empty((n, h, w, c), dtype=np.float32) if patterns is None else patterns,
            grid=self.grid,
        )

    # ------------------------------------------------------------------ ask
    def ask(self, state: SearchState) -> tuple[np.ndarray, np.ndarray]:
        """Fill and return (masks, patterns) for this step's candidates; the last is the current trigger."""
        p = self.params
        k = p.k
        rng = state.rng
        prob = state.mask_prob.astype(np.float32)
        state.masks[-1] = prob >= 0.5
        state.patterns[-1] = state.mean_pattern
        theta_p = state.theta_p.astype(np.float32)
        sigma = np.float32(p.sigma)
        if p.sampling == "paired":
            h = k // 2  # h masks, each stamped with pattern noise +eps_j and -eps_j
            rng.random(out=state.u[:h], dtype=np.float32)
            shown = bernoulli_masks(state.u[:h], prob, state.masks[:h])
            state.masks[h:k] = state.masks[:h]
            if p.mask_pattern_noise:  # noise only where a mask shows the pattern (see _pattern_terms)
                n = shown * self.shape[2]
                standard_normals(rng, state.z[:n], state.z[n:])  # the second half is shown_noise's, free now
                state.eps[:h] = 0.0
                shown_noise(state.masks[:h], theta_p, sigma, n, state.z, state.eps)
                args = state.z[:2 * n]
                np.tanh(args, out=args)
                np.add(args, 1.0, out=args)
                np.multiply(args, 0.5, out=args)
                state.patterns[:k] = state.patterns[-1]  # hidden pixels: the mean pattern (never stamped)
                shown_patterns(state.masks[:h], state.z, n, state.patterns)
                return state.masks, state.patterns
            rng.standard_normal(out=state.eps[:h], dtype=np.float32)
            np.negative(state.eps[:h], out=state.eps[h:])
            noisy_patterns(theta_p, state.eps, sigma, state.patterns[:k])
            return state.masks, state.patterns
        half = k // 2 if p.antithetic else k
        rng.random(out=state.u[:half], dtype=np.float32)
        rng.standard_normal(out=state.eps[:half], dtype=np.float32)
        if p.antithetic:
            np.subtract(1.0, state.u[:half], out=state.u[half:])
            np.negative(state.eps[:half], out=state.eps[half:])
        bernoulli_masks(state.u, prob, state.masks[:k])
        if p.sampling == "joint":
            noisy_patterns(theta_p, state.eps, sigma, state.patterns[:k])
        else:
            state.patterns[:k] = state.mean_pattern
            state.masks[k:2 * k] = prob
            noisy_patterns(theta_p, state.eps, sigma, state.patterns[k:2 * k])
        return state.masks, state.patterns

    # ------------------------------------------------------------------ tell
    def tell(self, state: SearchState, ce: np.ndarray, success: float) -> None:
        """Update from the candidates' mean cross-entropy ``ce`` (n,) and the current trigger's success.

        ``success``: fraction of this step's minibatch images that the last candidate (the current trigger)
        sends to the class.
        """
        p = self.params
        prob = state.mask_prob
        # 1. book-keeping on the trigger distribution (at the parameters that produced the samples)
        soft_l1 = state.grid.l1(prob)
        state.last_success = float(success)
        state.best_success = max(state.best_success, float(success))
        if success >= p.success_threshold:
            if soft_l1 < state.best_l1:
                state.best_l1 = soft_l1
                if state.best_mask is None:
                    state.best_mask = np.empty(prob.shape, np.float32)
                    state.best_pattern = np.empty(state.theta_p.shape, np.float32)
                state.best_mask[...] = prob
                state.best_pattern[...] = state.mean_pattern

        self._advance(state, ce, success, state.theta_m, state.adam_m, found=state.best_mask is not None)

    def _advance(self, state, ce: np.ndarray, success: float, size_logits: np.ndarray, size_adam: Adam, *,
                 found: bool) -> None:
        """The rest of a step, shared with :class:`gate.blend.BlendSearch` (whose trigger size is an amplitude
        logit, not mask logits): NES estimates and Adam, or, when every sample lost the same (no signal),
        ``size_logits`` lowered by ``flat_shrink``; then the lambda schedule and the step limit."""
        p = self.params
        samples = np.asarray(ce[:p.candidates - 1])
        if p.flat_shrink > 0 and success < p.success_threshold and np.ptp(samples) == 0.0:
            state.flat_steps += 1
            np.maximum(size_logits - p.flat_shrink, FLAT_FLOOR, out=size_logits)
        else:
            grad_size, grad_p = self.gradients(state, ce)
            size_adam.step(size_logits, grad_size)
            state.adam_p.step(state.theta_p, grad_p)
        self._schedule(state, success)  # Neural Cleanse's lambda schedule
        state.step += 1
        if not state.done and state.step >= p.max_steps:
            state.done = True
            state.status = "max_steps" if found else "not_reached"

    def gradients(self, state: SearchState, ce: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NES estimates of d/d(theta_m) and d/d(theta_p) of E[F] from the last ask's losses ``ce``.

        F_j = ce_j + lambda |m_j|_1. Mask (Eq. 5): 1/k sum F_j 2 (m_j - g(theta_m)), the score function of
        Bernoulli(g(theta_m)) in theta_m. Pattern (Eq. 6): 1/(k sigma) sum F_j eps_j. With ``exact_penalty``
        the lambda term's gradient is added in closed form instead of being estimated.
        """
        p = self.params
        k = p.k
        prob = state.mask_prob
        ce = np.asarray(ce[:p.candidates], dtype=np.float64)
        if p.sampling == "paired":
            h = k // 2
            f_m = 0.5 * (ce[:h] + ce[h:k])  # each mask's loss, pattern noise averaged out
            masks = state.masks[:h]
            grad_p = self._pattern_terms(state, ce[:h] - ce[h:k], h) / (2 * h * p.sigma)
        else:
            f_m = ce[:k]
            masks = state.masks[:k]
        n = len(f_m)
        lam = state.lam / state.grid.cell_area  # lambda is per searched cell (see SearchParams.lambda_init)
        if not p.exact_penalty:  # lambda |m_j|_1 in cells
            f_m = f_m + lam * state.grid.weigh(masks).sum(axis=(1, 2), dtype=np.float64)
        if p.sampling != "paired":
            f_p = f_m if p.sampling == "joint" else ce[k:2 * k]
            if p.baseline:
                f_p = f_p - self._baseline(f_p)
            if p.sampling == "joint":
                grad_p = self._pattern_terms(state, f_p, k) / (k * p.sigma)
            else:
                grad_p = (f_p @ state.eps[:k].reshape(k, -1)) / (k * p.sigma)
        if p.baseline:
            f_m = f_m - self._baseline(f_m, pairs=p.antithetic and p.sampling != "paired")
        grad_m = (2.0 / n) * (f_m @ masks.reshape(n, -1) - f_m.sum() * prob.reshape(-1))
        if p.exact_penalty:  # d/d(theta_m) of lambda * E|m|_1 = lambda * sum area g(theta_m), in closed form
            grad_m += lam * 2.0 * state.grid.weigh(prob * (1.0 - prob)).reshape(-1)
        return grad_m.reshape(state.theta_m.shape), grad_p.reshape(state.theta_p.shape)

    def _pattern_terms(self, state: SearchState, f: np.ndarray, n: int) -> np.ndarray:
        """sum_j f_j eps_j, keeping only the pixels each sample's binary mask shows (m_j = 1).

        Where m_j = 0 the stamped image does not depend on eps_j at that pixel, so that term has zero
        expectation: dropping it keeps the estimate unbiased and removes most of its noise once the mask
        is sparse. (Rao-Blackwellisation; ``mask_pattern_noise=False`` keeps every term, as Eq. 6.) With paired
        sampling ``ask`` draws the noise only where m_j = 1 and leaves eps_j at 0 elsewhere: the same terms,
        without drawing (or multiplying by) the normals that would be dropped.
        """
        eps = state.eps[:n].reshape(n, -1, self.shape[2])
        if not self.params.mask_pattern_noise or self.params.sampling == "paired":
            return (f @ eps.reshape(n, -1)).reshape(-1)  # paired: ask drew eps only where m_j = 1 (0 elsewhere)
        shown = state.masks[:n].reshape(n, -1, 1)
        return np.einsum("j,jpc->pc", f, eps * shown).reshape(-1)

    def _baseline(self, f: np.ndarray, pairs: bool | None = None) -> np.ndarray:
        """Per-sample baseline independent of that sample (so the estimate stays unbiased).

        Leave-one-out for independent samples; leave-pair-out for antithetic pairs (j, j + n/2).
        """
        n = len(f)
        total = f.sum()
        pairs = self.params.antithetic if pairs is None else pairs
        if not pairs:
            return (total - f) / (n - 1)
        if n < 4:
            return np.zeros_like(f)
        h = n // 2
        pair = np.concatenate([f[:h] + f[h:], f[:h] + f[h:]])
        return (total - pair) / (n - 2)

    def _schedule(self, state: SearchState, success: float) -> None:
        p = self.params
        hit = success >= p.success_threshold
        if not state.lambda_active:
            if hit:
                state.lambda_active = True
                state.lam = p.lambda_init
                state.improve_ref = state.best_l1
                state.activation_l1 = state.best_l1
                state.steps_since_improve = 0
            return
        if hit:
            state.up_count += 1
            state.down_count = 0
        else:
            state.down_count += 1
            state.up_count = 0
        if state.up_count >= p.patience:
            state.lam *= p.lambda_up
            state.up_count = 0
            state.raised = True
        elif state.down_count >= p.patience:
            state.lam /= p.lambda_down
            state.down_count = 0
            state.lowered = True
        # early stop (as Neural Cleanse): once lambda has been both raised and lowered, stop when the best L1
        # has not improved by more than early_stop_tol for early_stop_patience steps. With noisy estimates
        # lambda can flicker up and down long before the mask starts to shrink, so the trigger must also have
        # shrunk by early_stop_min_shrink since it first succeeded; otherwise the class runs to max_steps.
        if state.best_l1 < (1.0 - p.early_stop_tol) * state.improve_ref:
            state.improve_ref = state.best_l1
            state.steps_since_improve = 0
        else:
            state.steps_since_improve += 1
            shrunk = state.best_l1 <= (1.0 - p.early_stop_min_shrink) * state.activation_l1
            if state.raised and state.lowered and shrunk and state.steps_since_improve >= p.early_stop_patience:
                state.done = True
                state.status = "converged"

    def explain(self, state: SearchState) -> str:
        """Why a class's search did not find a working trigger ("" when it did)."""
        if state.best_mask is not None:
            return ""
        why = (f"no trigger reached {self.params.success_threshold:.0%} success in {state.step} steps (best "
               f"{state.best_success:.0%} of a step's images)")
        if state.flat_steps:
            why += (f"; in {state.flat_steps} steps every sample had the same loss: the model's probability for "
                    "the class did not move however the trigger varied (exactly 0, or a constant output: no signal)")
        return why

    def stop(self, state: SearchState, status: str) -> None:
        state.done = True
        state.status = status
