"""bench.population_transfer: a rule's population refitted on a few clean models of another kind."""

import numpy as np

from bench.population_transfer import draws, refit_population, report
from bench.verdicts import Model
from gate.outliers import OutlierRule, population_fit


def _model(i, dataset, backdoored, scale):
    rng = np.random.default_rng(i)
    l1 = scale * np.exp(rng.normal(0, 0.3, 10))
    if backdoored:
        l1[3] = 2.0
    return Model(f"m{i}", dataset, "b3d", "arch", "badnets" if backdoored else "clean", backdoored,
                 (3,) if backdoored else (), l1, (1.0,) if backdoored else ())


def _zoo():
    return ([_model(i, "gtsrb", i % 3 == 0, 200.0) for i in range(18)]
            + [_model(100 + i, "cifar", i % 3 == 0, 60.0) for i in range(18)])


def test_the_refit_takes_the_clean_models_population_or_its_median_only():
    clean = [m for m in _zoo() if m.dataset == "cifar" and not m.backdoored][:4]
    rule = OutlierRule(population_mean=-1.47, population_scale=0.48)
    mean, scale = population_fit([(m.l1, m.pixels) for m in clean])
    both = refit_population(rule, clean)
    assert (both.population_mean, both.population_scale) == (mean, scale)
    median = refit_population(rule, clean, scale_too=False)
    assert (median.population_mean, median.population_scale) == (mean, 0.48)
    assert median.alpha == rule.alpha and median.population_weight == rule.population_weight


def test_draws_never_judge_the_models_the_population_was_fitted_on():
    target = [m for m in _zoo() if m.dataset == "cifar"]
    d = draws(OutlierRule(), target, 4, 5, seed=0)
    assert all(len(v) == 5 for v in d.values())
    # 12 clean target models, 4 drawn each time: each rate's denominator is the 8 others
    assert all(round(f * 8) == f * 8 for f in d["fpr"])


def test_the_report_has_a_table_per_direction():
    text, data = report(_zoo(), [3], 4, 0.03, 0)
    assert "### Fitted on GTSRB (18 models), judging CIFAR-10" in text
    assert "### Fitted on CIFAR-10 (18 models), judging GTSRB" in text
    assert "population median only refitted on 3 clean GTSRB models" in text
    assert set(data) == {"gtsrb->cifar", "cifar->gtsrb"}
    assert "CIFAR-10 rule, population median only refitted on 3 clean GTSRB models" in data["cifar->gtsrb"]["rows"]
