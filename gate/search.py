"""Gradient-free trigger search for one target class (B3D, Dong et al. ICCV 2021, Algorithm 1).

The search distribution is m ~ Bernoulli(g(theta_m)) for the H x W mask and p = g(theta_p + sigma*eps)
for the H x W x C pattern, g(z) = (tanh z + 1)/2. NES estimates of the gradient of the smoothed objective
F(m, p) = CE(c | (1-m)x + m p) + lambda |m|_1 (paper Eq. 5, 6) drive Adam on (theta_m, theta_p), and
lambda follows Neural Cleanse's schedule.

The interface is ask/tell, evaluation is the caller's business::

    search = TriggerSearch(shape, params)
    state = search.init(rng)
    while not state.done:
        cand = search.ask(state)              # masks (n,H,W), patterns (n,H,W,C)
        ce, hits = evaluate(cand)             # caller stamps and queries the model
        search.tell(state, ce, hits)

``ask`` returns the k search samples followed by one extra candidate, the current *mean* trigger
(soft mask g(theta_m), pattern g(theta_p)); its attack success drives the lambda schedule and the
choice of the best trigger, as in Neural Cleanse. With ``sampling="separate"`` (the paper's Eq. 5/6
exactly) mask samples use the mean pattern and pattern samples use the soft mask, 2k + 1 candidates;
``"joint"`` (default) draws (m_j, eps_j) together and uses each evaluation for both estimates, which is
an unbiased estimate of the gradient of the same smoothed objective at half the queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gate.kernels import bernoulli_masks, noisy_patterns


@dataclass(frozen=True)
class SearchParams:
    k: int = 50  # search samples per step
    sigma: float = 0.1
    lr: float = 0.05
    batch_size: int = 32  # clean images each candidate is stamped on, per step
    max_steps: int = 300
    sampling: str = "joint"  # "joint" or "separate" (paper Eq. 5/6 literally: 2k evaluations)
    antithetic: bool = True  # mirrored samples: (u, 1-u) for masks, (eps, -eps) for patterns
    baseline: bool = True  # subtract the mean fitness (variance reduction; keeps the estimate unbiased)
    lambda_init: float = 1e-3
    lambda_up: float = 1.5
    lambda_down: float = 1.5 ** 1.5
    patience: int = 5
    success_threshold: float = 0.99
    early_stop_patience: int = 25
    early_stop_tol: float = 0.01  # "improved" means best L1 fell by more than this fraction
    mask_init: float = 0.0  # initial theta_m (0 -> every pixel on with probability 0.5)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.sampling not in ("joint", "separate"):
            raise ValueError(f"sampling must be 'joint' or 'separate', got {self.sampling!r}")
        if self.k < 2 or (self.antithetic and self.k % 2):
            raise ValueError(f"k must be >= 2 (and even with antithetic sampling), got {self.k}")
        for name in ("sigma", "lr", "lambda_init", "lambda_up", "lambda_down"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_size < 1 or self.max_steps < 1 or self.patience < 1 or self.early_stop_patience < 1:
            raise ValueError("batch_size, max_steps, patience and early_stop_patience must be >= 1")
        if not 0 < self.success_threshold <= 1:
            raise ValueError("success_threshold must be in (0, 1]")

    @property
    def candidates(self) -> int:
        """Candidates per ask: the samples plus the mean trigger."""
        return (2 * self.k if self.sampling == "separate" else self.k) + 1

    def to_dict(self) -> dict:
        return asdict(self)


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
    eps: np.ndarray  # (k, H, W, C) normals for the pattern samples
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
    done: bool = False
    status: str = "running"
    last_success: float = 0.0
    history: list = field(default_factory=list)  # (step, lambda, success, soft L1) per step

    @property
    def mask_prob(self) -> np.ndarray:
        return g(self.theta_m)

    @property
    def mean_pattern(self) -> np.ndarray:
        return g(self.theta_p)

    def result_trigger(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(soft mask, pattern, L1) of the best successful trigger, else the current mean trigger."""
        if self.best_mask is not None:
            return self.best_mask, self.best_pattern, self.best_l1
        m = self.mask_prob.astype(np.float32)
        return m, self.mean_pattern.astype(np.float32), float(m.sum())


class TriggerSearch:
    """NES trigger search for one image shape; stateless itself, all state lives in :class:`SearchState`."""

    def __init__(self, image_shape: tuple[int, int, int], params: SearchParams | None = None) -> None:
        self.shape = tuple(image_shape)
        self.params = params or SearchParams()

    def init(self, rng: np.random.Generator) -> SearchState:
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
            masks=np.empty((n, h, w), dtype=np.float32),
            patterns=np.empty((n, h, w, c), dtype=np.float32),
        )

    # ------------------------------------------------------------------ ask
    def ask(self, state: SearchState) -> tuple[np.ndarray, np.ndarray]:
        """Fill and return (masks, patterns) for this step's candidates; the last one is the mean trigger."""
        p = self.params
        k = p.k
        half = k // 2 if p.antithetic else k
        rng = state.rng
        rng.random(out=state.u[:half], dtype=np.float32)
        rng.standard_normal(out=state.eps[:half], dtype=np.float32)
        if p.antithetic:
            np.subtract(1.0, state.u[:half], out=state.u[half:])
            np.negative(state.eps[:half], out=state.eps[half:])
        prob = state.mask_prob.astype(np.float32)
        mean_pattern = state.mean_pattern.astype(np.float32)
        theta_p = state.theta_p.astype(np.float32)
        if p.sampling == "joint":
            bernoulli_masks(state.u, prob, state.masks[:k])
            noisy_patterns(theta_p, state.eps, np.float32(p.sigma), state.patterns[:k])
        else:
            bernoulli_masks(state.u, prob, state.masks[:k])
            state.patterns[:k] = mean_pattern
            state.masks[k:2 * k] = prob
            noisy_patterns(theta_p, state.eps, np.float32(p.sigma), state.patterns[k:2 * k])
        state.masks[-1] = prob
        state.patterns[-1] = mean_pattern
        return state.masks, state.patterns

    # ------------------------------------------------------------------ tell
    def tell(self, state: SearchState, ce: np.ndarray, success: float) -> None:
        """Update from the candidates' mean cross-entropy ``ce`` (n,) and the mean trigger's success rate.

        ``success`` is the fraction of the step's clean images that the mean trigger sends to the class.
        """
        p = self.params
        prob = state.mask_prob
        # 1. book-keeping on the mean trigger (evaluated at the parameters that produced it)
        soft_l1 = float(prob.sum())
        state.last_success = float(success)
        if success >= p.success_threshold:
            if soft_l1 < state.best_l1:
                state.best_l1 = soft_l1
                if state.best_mask is None:
                    state.best_mask = np.empty(prob.shape, np.float32)
                    state.best_pattern = np.empty(state.theta_p.shape, np.float32)
                state.best_mask[...] = prob
                state.best_pattern[...] = state.mean_pattern
        state.history.append((state.step, state.lam, float(success), soft_l1))

        # 2. NES gradient estimates (paper Eq. 5, 6) and Adam
        grad_m, grad_p = self.gradients(state, ce)
        state.adam_m.step(state.theta_m, grad_m)
        state.adam_p.step(state.theta_p, grad_p)

        # 3. lambda schedule (Neural Cleanse)
        self._schedule(state, success)
        state.step += 1
        if state.done:
            return
        if state.step >= p.max_steps:
            state.done = True
            state.status = "max_steps" if state.best_mask is not None else "not_reached"

    def gradients(self, state: SearchState, ce: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NES estimates of d/d(theta_m) and d/d(theta_p) of E[F] from the last ask's losses ``ce``.

        F_j = ce_j + lambda |m_j|_1. Mask (Eq. 5): 1/k sum F_j 2 (m_j - g(theta_m)), the score function of
        Bernoulli(g(theta_m)) in theta_m. Pattern (Eq. 6): 1/(k sigma) sum F_j eps_j.
        """
        p = self.params
        k = p.k
        prob = state.mask_prob
        mask_l1 = state.masks[:k].sum(axis=(1, 2), dtype=np.float64)
        f_m = ce[:k] + state.lam * mask_l1
        if p.sampling == "joint":
            f_p = f_m
        else:
            f_p = ce[k:2 * k] + state.lam * float(prob.sum())
        if p.baseline:
            f_m = f_m - self._baseline(f_m)
            f_p = f_m if p.sampling == "joint" else f_p - self._baseline(f_p)
        flat_m = state.masks[:k].reshape(k, -1)
        grad_m = (2.0 / k) * (f_m @ flat_m - f_m.sum() * prob.reshape(-1))
        grad_p = (f_p @ state.eps.reshape(k, -1)) / (k * p.sigma)
        return grad_m.reshape(state.theta_m.shape), grad_p.reshape(state.theta_p.shape)

    def _baseline(self, f: np.ndarray) -> np.ndarray:
        """Per-sample baseline independent of that sample (so the estimate stays unbiased).

        Leave-one-out for independent samples; leave-pair-out for antithetic pairs (j, j + k/2).
        """
        k = len(f)
        total = f.sum()
        if not self.params.antithetic:
            return (total - f) / (k - 1)
        if k < 4:
            return np.zeros_like(f)
        h = k // 2
        pair = np.concatenate([f[:h] + f[h:], f[:h] + f[h:]])
        return (total - pair) / (k - 2)

    def _schedule(self, state: SearchState, success: float) -> None:
        p = self.params
        hit = success >= p.success_threshold
        if not state.lambda_active:
            if hit:
                state.lambda_active = True
                state.lam = p.lambda_init
                state.improve_ref = state.best_l1
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
        # has not improved by more than early_stop_tol for early_stop_patience steps
        if state.best_l1 < (1.0 - p.early_stop_tol) * state.improve_ref:
            state.improve_ref = state.best_l1
            state.steps_since_improve = 0
        else:
            state.steps_since_improve += 1
            if state.raised and state.lowered and state.steps_since_improve >= p.early_stop_patience:
                state.done = True
                state.status = "converged"

    def stop(self, state: SearchState, status: str) -> None:
        state.done = True
        state.status = status
