"""The UCI runner (``varlin uci``) end to end on a tiny generated dataset, and its scoring.

The dataset is written into ``tmp_path`` in the layout of the benchmark (``data.txt``,
``index_*.txt``, ``n_*.txt``); nothing is downloaded and no real data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from varlin import priors
from varlin.cli import main
from varlin.data import load_uci
from varlin.likelihoods import Likelihood
from varlin.predictive import RegressionPrediction
from varlin.training import VarlinWarning, fit
from varlin.uci import (
    SplitArrays,
    UCIConfig,
    build_likelihood,
    build_model,
    config_for,
    mean_and_stderr,
    original_units_log_likelihood,
    prepare_split,
    run_group,
    train_stacked,
)


def write_tiny_uci(root: Path, name: str = "tiny", *, rows: int = 60, splits: int = 2) -> None:
    """A 3-feature regression problem in the UCI layout, with 90/10 random splits."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    y = 50.0 + 20.0 * np.sin(X[:, 0]) + 0.5 * X[:, 1] + rng.normal(scale=2.0, size=rows)
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([X, y]))
    np.savetxt(folder / "index_features.txt", [0, 1, 2], fmt="%d")
    np.savetxt(folder / "index_target.txt", [3], fmt="%d")
    for file, value in (("n_splits.txt", splits), ("n_hidden.txt", 8), ("n_epochs.txt", 3)):
        (folder / file).write_text(f"{value}\n")
    n_test = rows // 10
    for i in range(splits):
        order = rng.permutation(rows)
        np.savetxt(folder / f"index_train_{i}.txt", np.sort(order[n_test:]), fmt="%d")
        np.savetxt(folder / f"index_test_{i}.txt", np.sort(order[:n_test]), fmt="%d")


@pytest.mark.parametrize("likelihood", ["homoscedastic", "heteroscedastic"])
def test_cli_runs_the_protocol_end_to_end(
    tmp_path: Path, likelihood: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_uci(tmp_path / "data")
    out = tmp_path / "results.json"
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--splits", "2"]
    argv += ["--epochs", "3", "--likelihood", likelihood, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "tiny: test LL" in capsys.readouterr().out

    results = json.loads(out.read_text())
    assert set(results) == {"tiny"}
    entry = results["tiny"]
    for key in ("test_ll", "rmse"):
        assert len(entry[key]) == 2
        assert all(math.isfinite(v) for v in entry[key])
        assert entry[key][1] >= 0  # a standard error
        assert len(entry["per_split"][key]) == 2
        assert entry[key] == pytest.approx(mean_and_stderr(entry["per_split"][key]))
    assert entry["rmse"][0] > 0
    assert entry["splits"] == 2
    assert entry["epochs"] == 3
    assert entry["seconds"] > 0
    assert entry["evaluated_on"] == "test"
    config = entry["config"]
    assert config["epochs"] == 3 and config["hidden"] == 8  # n_hidden.txt of the dataset
    assert config["likelihood"] == likelihood


def test_out_file_keeps_other_datasets_and_validation_mode_is_labelled(tmp_path: Path) -> None:
    write_tiny_uci(tmp_path / "data")
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"other": {"test_ll": [0.0, 0.0]}}))
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--splits", "1"]
    argv += ["--epochs", "2", "--validation", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"other", "tiny"}
    assert results["tiny"]["evaluated_on"].startswith("validation")
    assert results["tiny"]["splits"] == 1


def test_unknown_dataset_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["uci", "--dataset", "nope", "--data-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 1
    assert "nope" in capsys.readouterr().err


def test_validation_split_never_touches_test_rows(tmp_path: Path) -> None:
    write_tiny_uci(tmp_path)
    ds = load_uci("tiny", data_dir=tmp_path)
    train_idx, test_idx = ds.split(0)
    split = prepare_split(ds, 0, validation=True, val_fraction=0.2)
    n_val = round(0.2 * train_idx.size)
    assert split.X_eval.shape == (n_val, 3)
    assert split.X_train.shape == (train_idx.size - n_val, 3)
    # The held-out targets are training rows of the split, in original units.
    assert np.isin(split.y_eval, ds.y[train_idx]).all()
    assert not np.isin(split.y_eval, ds.y[test_idx]).any()
    # Standardised with the statistics of the rows it trains on.
    np.testing.assert_allclose(split.y_train.mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(split.y_train.std(), 1.0, atol=1e-12)
    np.testing.assert_allclose(split.X_train.mean(0), 0.0, atol=1e-12)


def test_test_split_uses_the_loaders_standardisation(tmp_path: Path) -> None:
    write_tiny_uci(tmp_path)
    ds = load_uci("tiny", data_dir=tmp_path)
    split = prepare_split(ds, 1)
    reference = ds.standardized_split(1)
    np.testing.assert_array_equal(split.X_train, reference.X_train)
    np.testing.assert_array_equal(split.y_eval, reference.y_test)
    assert split.y_std == float(reference.y_scaler.std)


def test_config_for_applies_overrides_but_ignores_none(tmp_path: Path) -> None:
    write_tiny_uci(tmp_path)
    ds = load_uci("tiny", data_dir=tmp_path)
    config = config_for(ds, epochs=7, lr=None)
    assert config.epochs == 7 and config.hidden == 8 and config.lr == 1e-2
    with pytest.raises(TypeError, match="unknown overrides"):
        config_for(ds, learning_rate=1.0)


def test_original_units_log_likelihood_matches_a_direct_computation() -> None:
    # A mixture of S = 3 Gaussians over standardised targets, for N = 4 examples.
    torch.manual_seed(0)
    dtype = torch.float64
    means = torch.randn(3, 4, dtype=dtype)
    variances = torch.rand(3, 4, dtype=dtype) + 0.1
    pred = RegressionPrediction(
        mean=means.mean(0),
        epistemic=means.var(0, unbiased=False),
        aleatoric=variances.mean(0),
        sample_means=means,
        sample_vars=variances,
    )
    y_mean, y_std = 22.5, 9.2
    y = torch.tensor([10.0, 20.0, 30.0, 45.0], dtype=dtype)

    got = original_units_log_likelihood(pred, y, y_mean, y_std)

    # Direct: the mixture in original units has components N(y_std * m + y_mean, y_std^2 * v).
    components = Normal(means * y_std + y_mean, variances.sqrt() * y_std)
    direct = torch.logsumexp(components.log_prob(y), dim=0) - math.log(3)
    torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-12)
    # ... which is the standardised log density minus log(std_y).
    standardized = pred.log_prob((y - y_mean) / y_std)
    torch.testing.assert_close(got, standardized - math.log(y_std), rtol=1e-12, atol=1e-12)


def test_mean_and_stderr_uses_population_std() -> None:
    values = [1.0, 2.0, 4.0, 5.0]
    mean, stderr = mean_and_stderr(values)
    assert mean == 3.0
    assert stderr == pytest.approx(np.std(values) / 2.0)  # ddof=0, sqrt(4) = 2
    with pytest.raises(ValueError):
        mean_and_stderr([])


def test_stacked_training_matches_varlin_fit_split_by_split(tmp_path: Path) -> None:
    # Second route: train_stacked trains K splits as slices of stacked tensors; each slice must
    # follow varlin.fit on its split alone. With a posterior scale of 1e-8 the weight noise is
    # negligible, so both routes are deterministic; a full batch makes the shuffles irrelevant.
    write_tiny_uci(tmp_path)
    ds = load_uci("tiny", data_dir=tmp_path)
    splits = [prepare_split(ds, i) for i in range(2)]
    n = splits[0].X_train.shape[0]
    config = config_for(ds, epochs=4, batch_size=n, init_scale=1e-8, lr=1e-2)
    for likelihood in ("homoscedastic", "heteroscedastic"):
        cfg = dataclasses.replace(config, likelihood=likelihood)
        for split, (model, _) in _stacked_and_fitted(splits, cfg):
            # ... and they moved: the comparison is not between two untrained models.
            torch.manual_seed(cfg.seed * 1000 + split.index)
            fresh = build_model(3, cfg)
            assert not torch.allclose(fresh[0].w_posterior.loc, model[0].w_posterior.loc)


def _stacked_and_fitted(
    splits: list[SplitArrays], cfg: UCIConfig
) -> list[tuple[SplitArrays, tuple[nn.Module, Likelihood]]]:
    """Train ``splits`` with train_stacked, check every parameter of each split's model and
    likelihood against varlin.fit on that split alone, and return the stacked route's."""
    n = splits[0].X_train.shape[0]
    stacked = train_stacked(splits, cfg)
    for split, (model, lik) in zip(splits, stacked, strict=True):
        torch.manual_seed(cfg.seed * 1000 + split.index)
        ref_model, ref_lik = build_model(3, cfg), build_likelihood(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VarlinWarning)  # 4 steps prove nothing
            fit(
                ref_model,
                torch.as_tensor(split.X_train, dtype=torch.float32),
                torch.as_tensor(split.y_train, dtype=torch.float32),
                likelihood=ref_lik,
                epochs=cfg.epochs,
                batch_size=n,
                lr=cfg.lr,
                progress=False,
            )
        got = dict(model.named_parameters()) | dict(lik.named_parameters())
        want = dict(ref_model.named_parameters()) | dict(ref_lik.named_parameters())
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    return list(zip(splits, stacked, strict=True))


@pytest.mark.parametrize(("workers", "trainer"), [("2", "stacked"), ("1", "fit")])
def test_parallel_workers_and_the_fit_trainer(tmp_path: Path, workers: str, trainer: str) -> None:
    write_tiny_uci(tmp_path / "data", splits=3)
    out = tmp_path / "results.json"
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--epochs", "2"]
    argv += ["--workers", workers, "--trainer", trainer, "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)
        assert main(argv) == 0
    entry = json.loads(out.read_text())["tiny"]
    assert entry["splits"] == 3 and entry["config"]["trainer"] == trainer
    assert len(entry["per_split"]["test_ll"]) == 3
    assert all(math.isfinite(v) for v in entry["per_split"]["test_ll"] + entry["per_split"]["rmse"])


@pytest.mark.parametrize(
    ("posterior", "estimator"),
    [("lowrank", "local"), ("matrix_normal", "local"), ("full", "reparameterization"),
     ("radial", "flipout")],
)  # fmt: skip
def test_the_runner_trains_every_posterior_family(
    tmp_path: Path, posterior: str, estimator: str
) -> None:
    """``--posterior``: the stacked trainer names no family, so each runs through the runner."""
    write_tiny_uci(tmp_path / "data", splits=2)
    out = tmp_path / "results.json"
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--epochs", "2"]
    argv += ["--likelihood", "heteroscedastic", "--posterior", posterior, "--estimator", estimator]
    argv += ["--test-samples", "20", "--out", str(out), "--no-progress"]
    argv += ["--rank", "2"] if posterior == "lowrank" else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)
        assert main(argv) == 0
    entry = json.loads(out.read_text())["tiny"]
    assert entry["config"]["posterior"] == posterior and entry["config"]["trainer"] == "stacked"
    assert all(math.isfinite(v) for v in entry["per_split"]["test_ll"] + entry["per_split"]["rmse"])
    # The heteroscedastic head starts at the noise level whichever factor holds its bias.
    ds = load_uci("tiny", data_dir=tmp_path / "data")
    rank = 2 if posterior == "lowrank" else None
    config = config_for(
        ds, likelihood="heteroscedastic", posterior=posterior, rank=rank, estimator=estimator
    )
    head = build_model(3, config)[2]
    bias = head.w_posterior.bias_loc_of(head.b_posterior)
    assert float(bias[1].detach()) == pytest.approx(math.log(math.expm1(config.noise_init)))


@pytest.mark.parametrize("likelihood", ["homoscedastic", "heteroscedastic"])
def test_stacked_radial_splits_score_as_split_by_split_fits(
    tmp_path: Path, likelihood: str
) -> None:
    """A second family through both trainers: the same scores (scales at 1e-8: no real noise).

    (The low-rank, matrix-normal and full families train their off-diagonal factors away from 0
    within a few steps, so their noise is real and the two trainers' noise streams part; see
    ``tests/test_ensemble.py``.)
    """
    write_tiny_uci(tmp_path, splits=2)
    ds = load_uci("tiny", data_dir=tmp_path)
    splits = [prepare_split(ds, i) for i in range(2)]
    config = config_for(
        ds, epochs=4, batch_size=8, init_scale=1e-8, posterior="radial",
        estimator="reparameterization", likelihood=likelihood, test_samples=20,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)  # 4 epochs prove nothing
        stacked = run_group(splits, config)
        separate = run_group(splits, dataclasses.replace(config, trainer="fit"))
    for got, want in zip(stacked, separate, strict=True):
        assert got.log_likelihood == pytest.approx(want.log_likelihood, abs=1e-5)
        assert got.rmse == pytest.approx(want.rmse, rel=1e-5)


def test_a_family_the_estimator_cannot_take_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_uci(tmp_path)
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path), "--posterior", "radial"]
    assert main([*argv, "--no-progress"]) == 1  # the default estimator, local, has no radial form
    err = capsys.readouterr().err.strip()
    assert "--posterior radial" in err and "estimator='local'" in err and "\n" not in err


def test_each_split_keeps_its_own_training_diagnostics(tmp_path: Path) -> None:
    """Both trainers attribute the same diagnostics to each split, without a model prefix.

    Posterior scales of 1e-7 trained for 2 epochs: every split's posterior collapses (and its
    KL term dominates); the stacked trainer names the ensemble's models, the runner maps them
    back to the splits.
    """
    from varlin.uci import run_group

    write_tiny_uci(tmp_path, splits=3)
    ds = load_uci("tiny", data_dir=tmp_path)
    splits = [prepare_split(ds, i) for i in range(3)]
    kinds = {}
    for trainer in ("stacked", "fit"):
        config = config_for(ds, epochs=2, init_scale=1e-7, trainer=trainer)
        results = run_group(splits, config)
        assert [r.index for r in results] == [0, 1, 2]
        kinds[trainer] = [[note.split(" (")[0] for note in r.warnings] for r in results]
    assert kinds["stacked"] == kinds["fit"]
    for notes in kinds["stacked"]:
        assert "posterior scales collapsed towards 0" in notes, notes
        assert not any(note.startswith("model ") for note in notes)


def test_empirical_prior_stacked_training_matches_varlin_fit(tmp_path: Path) -> None:
    """``prior="empirical"``: every layer's weight and bias prior scale is a parameter, and the
    stacked route (fit_ensemble, the tensors swapped by functional_call under vmap) trains it
    exactly as ``varlin.fit`` does on each split alone; the scales moved off their start."""
    write_tiny_uci(tmp_path)
    ds = load_uci("tiny", data_dir=tmp_path)
    splits = [prepare_split(ds, i) for i in range(2)]
    n = splits[0].X_train.shape[0]
    config = config_for(ds, epochs=4, batch_size=n, init_scale=1e-8, lr=5e-2, prior="empirical")
    for likelihood in ("homoscedastic", "heteroscedastic"):
        cfg = dataclasses.replace(config, likelihood=likelihood)
        for _, (model, _) in _stacked_and_fitted(splits, cfg):
            raw = [name for name, _ in model.named_parameters() if name.endswith("prior.raw_scale")]
            assert raw == ["0.w_prior.raw_scale", "0.b_prior.raw_scale"] + [
                "2.w_prior.raw_scale", "2.b_prior.raw_scale"
            ]  # fmt: skip
            scales = priors.learned_scales(model)
            assert all(abs(s - cfg.prior_scale) > 1e-3 for s in scales.values()), scales


def test_uci_prior_empirical_records_the_learned_scales(tmp_path: Path) -> None:
    write_tiny_uci(tmp_path / "data", splits=2)
    out = tmp_path / "results.json"
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--epochs", "3"]
    argv += ["--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VarlinWarning)
        assert main([*argv, "--prior", "empirical", "--out", str(out)]) == 0
        assert main([*argv, "--prior", "fixed", "--out", str(tmp_path / "f.json")]) == 0
    entry = json.loads(out.read_text())["tiny"]
    assert entry["config"]["prior"] == "empirical"
    scales = entry["per_split"]["prior_scales"]
    assert len(scales) == 2
    assert set(scales[0]) == {"0.w_prior", "0.b_prior", "2.w_prior", "2.b_prior"}
    assert all(0 < s and math.isfinite(s) for split in scales for s in split.values())
    fixed = json.loads((tmp_path / "f.json").read_text())["tiny"]
    assert fixed["config"]["prior"] == "fixed" and "prior_scales" not in fixed["per_split"]


def test_uci_prior_must_be_fixed_or_empirical(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["uci", "--dataset", "tiny", "--prior", "learned"])
    assert "--prior: invalid choice: 'learned'" in capsys.readouterr().err


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("likelihood", ["homoscedastic", "heteroscedastic"])
def test_moments_method_trains_and_scores_by_moment_propagation(
    tmp_path: Path, likelihood: str, covariance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_uci(tmp_path / "data")
    out = tmp_path / "results.json"
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data"), "--splits", "1"]
    argv += ["--epochs", "3", "--likelihood", likelihood, "--out", str(out), "--no-progress"]
    argv += ["--method", "moments", "--covariance", covariance]
    assert main(argv) == 0
    entry = json.loads(out.read_text())["tiny"]
    assert entry["config"]["method"] == "moments"
    assert entry["config"]["covariance"] == covariance
    assert all(math.isfinite(v) for v in entry["test_ll"])


def test_covariance_without_moments_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_uci(tmp_path / "data")
    argv = ["uci", "--dataset", "tiny", "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--covariance", "full"]) == 1
    err = capsys.readouterr().err
    assert "--covariance full applies only to --method moments" in err
    assert err.count("\n") == 1
