"""evaluate.py end to end: the JSON and markdown it writes, with Inception weights and the
classification accuracy score, the audit in D's feature space, and its errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_user_error, smoke
from PIL import Image

import checkpoints
import dataset
import evaluate
import metrics
import settings
import train


def test_evaluate_cli_writes_json_and_markdown(cond_run, data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(cond_run / "Models"), "--data-root", str(data), "--n", "32", "--out", str(out)]
    assert evaluate.main(args) == 0
    results = json.loads(out.read_text())
    assert {"swd", "ms_ssim_fake", "ms_ssim_real", "precision", "recall", "d_overfit"} <= set(results)
    assert results["n"] == 32 and results["step"] == 12 and results["features"] == "pixels16"
    assert "fid" not in results and "FID/KID skipped" in capsys.readouterr().out
    assert {"copy_rate", "authenticity", "nn_dist_fake", "nn_dist_heldout"} <= set(results)  # data has test/
    figure = np.asarray(Image.open(tmp_path / "memorisation.png"))  # 8 closest pairs: generated over training
    assert figure.shape == (2 + 2 * 34, 2 + 8 * 34)
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| metric | value |") and "| swd |" in table
    assert evaluate.main(args + ["--out", str(tmp_path / "again.json")]) == 0  # seeded: same figures
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {k: v for k, v in results.items()
                                                                      if k != "checkpoint"}


def test_evaluate_cli_with_inception_weights_and_cas(cond_run, data, tmp_path, inception_file):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(cond_run / "Models"), "--data-root", str(data), "--n", "16",
                          "--inception-weights", str(inception_file), "--cas", "--cas-epochs", "1",
                          "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["features"] == "inception" and results["fid"] > 0 and np.isfinite(results["kid"])
    # the same figures as the Evaluator gives for that checkpoint, data and seed with those weights
    state, _ = checkpoints.load_checkpoint(cond_run / "Models")
    data_set = dataset.load_slices(settings.checkpoint_settings(state, str(data)))
    inception = metrics.load_inception(str(inception_file), torch.device("cpu"))
    evaluator = metrics.Evaluator(data_set.images, data_set.labels, 16, 0, inception,
                                  heldout=metrics.heldout_slices(settings.checkpoint_settings(state, str(data)),
                                                                 data_set))
    again = evaluator(checkpoints.load_generator(state, torch.device("cpu")), torch.device("cpu"))
    assert results["fid"] == pytest.approx(again["fid"], rel=1e-6) and results["kid"] == pytest.approx(again["kid"])
    assert set(results["cas"]) == {"real", "synthetic", "real+synthetic"}
    test_size = 2 * 24  # the shared data's test split: 24 slices per class
    for scores in results["cas"].values():  # accuracy counts whole test slices
        assert 0 <= scores["auc"] <= 1 and scores["accuracy"] * test_size == pytest.approx(
            round(scores["accuracy"] * test_size), abs=1e-6)
    assert "CAS, trained on synthetic" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--n", "2"], "--n"),
    (["--device", "tpu"], "--device"),
    (["--cas-epochs", "0"], "--cas-epochs"),
])
def test_evaluate_bad_flags(capsys, argv, needle):
    assert_user_error(capsys, evaluate.main(argv), needle)


def test_evaluate_cas_needs_a_conditional_checkpoint_and_a_test_split(capsys, data, tmp_path, cond_run):
    plain = tmp_path / "plain"
    assert train.main(smoke(data, plain, "--max-steps", "2", "--eval-every", "0")) == 0
    code = evaluate.main(["--checkpoint", str(plain / "Models"), "--data-root", str(data), "--cas"])
    assert_user_error(capsys, code, "--cas", "--conditional")
    no_test = tmp_path / "no_test"
    shutil.copytree(data / "train", no_test / "train", dirs_exist_ok=True)
    code = evaluate.main(["--checkpoint", str(cond_run / "Models"), "--data-root", str(no_test), "--cas"])
    assert_user_error(capsys, code, "--cas", "test")


def test_evaluate_missing_checkpoint(capsys, tmp_path):
    assert_user_error(capsys, evaluate.main(["--checkpoint", str(tmp_path / "nope")]), "nope")


def test_evaluations_with_d_report_the_audit_in_its_space(cond_run, data, tmp_path):
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(cond_run / "Models"), "--data-root", str(data), "--n", "32",
                          "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"copy_rate_d", "authenticity_d", "nn_dist_fake_d", "nn_dist_heldout_d"} <= set(results)
    assert 0 <= results["copy_rate_d"] <= 1 and results["nn_dist_fake_d"] > 0
