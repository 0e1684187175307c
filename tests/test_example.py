"""examples/vqvae_digits.py runs end to end with tiny settings, and its numbers make sense."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vqvae_digits.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("vqvae_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def tiny_config(example, **overrides):
    settings = dict(epochs=1, kmeans_iters=3, em_iters=3, hidden=16, shallow_codes=8, codebook_size=8,
                    positions=2, code_dim=3, batch_size=256, num_show=3, progress=False)
    return example.Config(**(settings | overrides))


def test_split_is_fixed_and_disjoint(example):
    train, test = example.load_split(tiny_config(example))
    train_again, test_again = example.load_split(tiny_config(example, seed=5))  # --seed never moves the split
    assert train.shape == (1437, 64) and test.shape == (360, 64)
    assert torch.equal(train, train_again) and torch.equal(test, test_again)
    assert float(train.min()) == 0.0 and float(train.max()) == 16.0


def test_code_usage_metrics(example):
    perplexity, utilization = example.code_usage(torch.tensor([0, 1, 2, 3]), 8)  # uniform over 4 of 8
    assert math.isclose(perplexity, 4.0) and utilization == 0.5
    perplexity, utilization = example.code_usage(torch.tensor([[5, 5], [5, 5]]), 8)
    assert math.isclose(perplexity, 1.0) and utilization == 0.125


def test_all_models_and_compare_with_tiny_settings(example, tmp_path, capsys):
    threads = torch.get_num_threads()
    cfg = tiny_config(example)
    results = example.run(cfg, out=tmp_path, compare=True)
    assert torch.get_num_threads() == threads  # the example restores the caller's setting

    assert [r.name.split(" ")[0] for r in results] == ["1", "2", "3", "4", "4"]
    assert "vector-quantize-pytorch" in results[4].name
    train, test = example.load_split(cfg)
    mean_image_mse = float(((test - train.mean(0)) ** 2).mean())  # the zero-information baseline
    for result in results:
        assert result.reconstructions.shape == (cfg.num_show, 64) and result.samples.shape == (cfg.num_show, 64)
        assert math.isfinite(result.test_mse) and result.test_mse > 0 and result.seconds > 0
    for shallow in results[:2]:  # even 3 Lloyd / EM iterations beat the mean image
        assert shallow.test_mse < mean_image_mse
    for vq, num_codes in ((results[0], 8), (results[1], 8), (results[3], 8), (results[4], 8)):
        assert 1.0 <= vq.perplexity <= num_codes + 1e-9
        assert 0.0 < vq.utilization <= 1.0
    assert results[2].perplexity is None  # the beta-VAE has no codebook

    printed = capsys.readouterr().out
    for result in results:
        assert result.name in printed
    assert "vector-quantize-pytorch test MSE" in printed

    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "samples.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300


def test_command_line(example, tmp_path, capsys):
    results = example.main(["--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"), "--seed", "3"])
    assert len(results) == 4
    assert (tmp_path / "run" / "samples.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
