"""Windows as views, the model files (mmap, refusals), device choice, OOM halving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcbatch.errors import ConfigError, DataError
from hpcbatch.stocks import model as M
from hpcbatch.stocks.features import CLOSE_PCT, unsquash
from hpcbatch.stocks.predict import inference_batch
from hpcbatch.stocks.windows import iter_batches, prediction_windows, training_index


def test_prediction_windows_are_views_with_the_right_days():
    feats = np.arange(2 * 130 * 105, dtype=np.float32).reshape(2, 130, 105)
    win = prediction_windows(feats, 10)
    assert win.shape == (2, 10, 60, 105)
    assert np.shares_memory(win, feats) and not win.flags.owndata
    # window k ends on day 130 - 10 + k and starts 59 days earlier
    np.testing.assert_array_equal(win[1, 9], feats[1, 70:130])
    np.testing.assert_array_equal(win[0, 0], feats[0, 61:121])
    batches = list(iter_batches(win, 7))
    assert [s for s, _ in batches] == [0, 7, 14]
    assert all(b.flags.c_contiguous and b.dtype == np.float32 for _, b in batches)
    np.testing.assert_array_equal(batches[1][1][3], win[1, 0])  # flat index 10 = stock 1, day 0
    with pytest.raises(ConfigError, match="predict-days"):
        prediction_windows(feats, 80)


def test_training_windows_skip_warmup_and_keep_a_target_day():
    idx = training_index(np.array([200, 150]), 200)
    first = {s: idx[idx[:, 0] == s, 1].min() for s in (0, 1)}
    last = {s: idx[idx[:, 0] == s, 1].max() for s in (0, 1)}
    assert first == {0: 60, 1: 110}  # stock 1 starts 50 days later, plus 60 warm-up days
    assert last[0] + 60 == 199  # the window's last day is followed by a target day


def test_full_model_has_the_reference_architecture():
    n = M.n_parameters(M.ModelConfig())
    assert 8_000_000 < n < 10_000_000
    m = M.StockModel(M.SIZES["tiny"])
    out, conf = m(torch.zeros(3, 60, 105))
    assert out.shape == (3, 60, 105) and conf.shape == (3,)
    assert torch.all((conf > 0) & (conf < 1))


def test_weights_are_memory_mapped_and_loaded_once_per_process(tiny_model):
    M._CACHE.clear()
    first = M.cached_model(tiny_model)
    assert M.cached_model(tiny_model) is first
    weights = str((tiny_model / M.WEIGHTS_FILE).resolve())
    maps = Path("/proc/self/maps").read_text()
    assert weights in maps  # the file is mapped, not read into the heap
    ptr = next(first.model.parameters()).data_ptr()
    ranges = [
        [int(x, 16) for x in line.split()[0].split("-")]
        for line in maps.splitlines()
        if line.endswith(weights)
    ]
    assert any(lo <= ptr < hi for lo, hi in ranges)


def test_predictions_are_denormalised_to_real_returns(tiny_model):
    loaded = M.load_model(tiny_model)
    z = np.array([0.0, 1.0, -2.0])
    feature = z * loaded.std[CLOSE_PCT] + loaded.mean[CLOSE_PCT]
    expected = unsquash(feature) / 100
    np.testing.assert_allclose(M.denormalise_return(loaded, z), expected)
    win = np.random.default_rng(0).normal(size=(4, 2, 60, 105)).astype(np.float32)
    ret, conf, used = M.predict_windows(loaded, win, batch=3)
    assert ret.shape == (8,) and used == 3 and np.all((conf > 0) & (conf < 1))
    assert np.all(np.abs(ret) < 0.5)  # real returns, not z-scores or percent
    with torch.inference_mode():
        x = (torch.from_numpy(win[1, 0][None]) - torch.from_numpy(loaded.mean)) / torch.from_numpy(
            loaded.std
        )
        out, _ = loaded.model(x)
    assert ret[2] == pytest.approx(M.denormalise_return(loaded, out[0, -1, CLOSE_PCT].numpy()))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_last_step_prediction_equals_the_whole_sequence_forward(size):
    """predict_last (what predict_windows runs) skips the discarded 59 steps after the
    LSTM: the same last-step outputs as forward (issue 15: 1.8-3.3x less CPU)."""
    torch.manual_seed(0)
    model = M.StockModel(M.model_config(size)).eval()
    x = torch.randn(7, 60, 105)
    with torch.inference_mode():
        out, conf = model(x)
        last, last_conf = model.predict_last(x)
    assert last.shape == (7, 105) and last_conf.shape == (7,)
    torch.testing.assert_close(last, out[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_conf, conf, rtol=1e-5, atol=1e-6)


def _copy(model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(model_dir, dst)
    return dst


def test_missing_and_corrupt_model_directories_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        M.load_model(tmp_path / "nope")
    bad = _copy(tiny_model, tmp_path)
    (bad / M.WEIGHTS_FILE).write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="corrupt"):
        M.load_model(bad)
    (bad / M.NORM_FILE).unlink()
    with pytest.raises(DataError, match="norm.npz"):
        M.load_model(bad)


def test_a_pickled_model_object_is_refused_by_weights_only(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    torch.save(M.StockModel(M.SIZES["tiny"]), bad / M.WEIGHTS_FILE)  # whole module, not a state dict
    with pytest.raises(DataError, match="weights_only"):
        M.load_model(bad)
    torch.save([torch.zeros(2)], bad / M.WEIGHTS_FILE)
    with pytest.raises(DataError, match="not a state dict"):
        M.load_model(bad)


def test_weights_of_another_architecture_are_refused(tiny_model, tmp_path):
    bad = _copy(tiny_model, tmp_path)
    torch.save(M.StockModel(M.ModelConfig(d_model=24, hidden=8, lstm_layers=1, ff_inner=32, n_blocks=1)).state_dict(), bad / M.WEIGHTS_FILE)
    with pytest.raises(DataError, match="do not fit the architecture"):
        M.load_model(bad)


def test_use_gpu_choices():
    assert M.resolve_device("auto", cuda_available=False) == "cpu"
    assert M.resolve_device("auto", cuda_available=True) == "cuda"
    assert M.resolve_device("false", cuda_available=True) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        M.resolve_device("true", cuda_available=False)
    with pytest.raises(ConfigError, match="auto, true or false"):
        M.resolve_device("maybe", cuda_available=False)


def test_gpu_batch_comes_from_free_memory_and_the_plan():
    per_window = 1_000_000
    assert inference_batch("cuda", 256, free_bytes=10**9, per_window_bytes=per_window, fraction=0.8) == 800
    assert inference_batch("cuda", 256, planned_gpu_batch=100, free_bytes=10**9, per_window_bytes=per_window) == 100
    assert inference_batch("cuda", 256, free_bytes=10, per_window_bytes=per_window) == 1
    assert inference_batch("cpu", 256, free_bytes=10**12, per_window_bytes=per_window) == 256


def test_batch_is_halved_on_out_of_memory_and_every_item_runs_once():
    done, sizes = [], []

    def step(start, stop):
        sizes.append(stop - start)
        if stop - start > 25:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        done.extend(range(start, stop))

    halvings = []
    used = M.run_batches(100, 100, step, on_oom=lambda: halvings.append(1))
    assert used == 25 and len(halvings) == 2
    assert sorted(done) == list(range(100))
    assert sizes[:3] == [100, 50, 25]

    def always(start, stop):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError):
        M.run_batches(4, 4, always)

    def other(start, stop):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        M.run_batches(4, 4, other)


def test_inference_after_a_fake_cuda_oom_gives_the_same_predictions(tiny_model):
    """predict_windows halves its batch on OOM and still predicts every window once."""
    loaded = M.load_model(tiny_model)
    win = np.random.default_rng(1).normal(size=(3, 5, 60, 105)).astype(np.float32)
    expected, expected_conf, _ = M.predict_windows(loaded, win, batch=15)

    class SmallDevice(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, []

        def forward(self, x):
            self.calls.append(x.shape[0])
            if x.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return self.inner(x)

    fake = SmallDevice(loaded.model)
    oom = M.LoadedModel(fake, loaded.config, loaded.mean, loaded.std, "v", "cpu", "")
    got, conf, used = M.predict_windows(oom, win, batch=15)
    assert used == 3 and fake.calls[:3] == [15, 7, 3]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(conf, expected_conf, rtol=1e-5)
