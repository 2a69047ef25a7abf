"""The `kiln` Python package, tested against the installed wheel."""

import gzip
import os
import pathlib

import numpy as np
import pytest

import kiln

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "mnist-sample"


def idx(name, offset):
    """An IDX file of the bundled MNIST sample as a uint8 array."""
    return np.frombuffer(gzip.open(SAMPLE / name).read(), np.uint8, offset=offset)


@pytest.fixture(scope="module")
def sample():
    images = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = idx("train-labels-idx1-ubyte.gz", 8)
    test_images = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    test_labels = idx("t10k-labels-idx1-ubyte.gz", 8)
    return images, labels, test_images, test_labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, report = kiln.train("mlp", "mnist-sample", epochs=2, batch_size=64, seed=3, threads=1)
    return model, report


def test_train_returns_a_model_that_learned(trained):
    model, report = trained
    assert report["epochs"] == 2
    assert report["test_accuracy"] > 0.85
    assert model.name == "mlp"
    assert model.input_shape == [1, 28, 28]
    assert model.classes == 10
    assert model.num_params == 784 * 64 + 64 + 64 * 10 + 10
    assert "Dense" in model.summary()
    assert "kiln.Model('mlp'" in repr(model)


def test_predict_takes_numpy_images_and_returns_probabilities(trained, sample):
    model, _ = trained
    _, _, test_images, test_labels = sample
    x = test_images[:100].reshape(100, 1, 28, 28).astype(np.float32) / 255
    probs = model.predict(x)
    assert probs.shape == (100, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == test_labels[:100]).mean() > 0.8
    # Flattened images, float64 input and a non-contiguous view give the same answer.
    np.testing.assert_array_equal(model.predict(x.reshape(100, 784)), probs)
    np.testing.assert_array_equal(model.predict(x.astype(np.float64)), probs)
    wide = np.zeros((100, 1, 28, 56), np.float32)
    wide[:, :, :, ::2] = x
    np.testing.assert_array_equal(model.predict(wide[:, :, :, ::2]), probs)
    # Fortran order: contiguous, but not in C order.
    np.testing.assert_array_equal(model.predict(np.asfortranarray(x)), probs)


def test_fit_and_evaluate_on_numpy_arrays(sample):
    images, labels, test_images, test_labels = sample
    model = kiln.build("mlp", seed=5, threads=1)
    before = model.evaluate(test_images, test_labels)
    report = model.fit(images, labels.astype(np.int64), epochs=1, batch_size=64)
    assert report["epochs"] == 1 and report["seconds"] > 0
    after = model.evaluate(test_images, test_labels)
    assert after["examples"] == len(test_labels)
    assert after["accuracy"] > before["accuracy"] + 0.5
    # A non-contiguous uint8 view (copied element by element, where a
    # C-contiguous array is one memcpy) gives the same evaluation.
    wide = np.zeros((len(test_images), 28, 56), np.uint8)
    wide[:, :, ::2] = test_images
    assert model.evaluate(wide[:, :, ::2], test_labels) == after
    # So does a Fortran-ordered copy (contiguous, not in C order).
    assert model.evaluate(np.asfortranarray(test_images), test_labels) == after
    # A second fit continues from the same optimiser state and weights.
    again = model.fit(images, labels, epochs=1, batch_size=64)
    assert again["loss"] < report["loss"]


def test_save_load_and_state_dict_round_trip(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "mlp.safetensors"
    model.save(str(path))
    loaded = kiln.load(str(path))
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))

    state = model.state_dict()
    assert state["1.dense.weight"].shape == (784, 64)
    fresh = kiln.build("mlp", seed=99)
    assert not np.array_equal(fresh.predict(x), model.predict(x))
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    # A weight in Fortran order (PyTorch's `Linear.weight.T`) loads by its
    # logical layout, not its memory order.
    other = kiln.build("mlp", seed=99)
    other.load_state_dict({**state, "1.dense.weight": np.asfortranarray(state["1.dense.weight"])})
    np.testing.assert_array_equal(other.predict(x), model.predict(x))


def test_errors_are_kiln_errors_with_clear_messages(trained, sample, tmp_path):
    model, _ = trained
    images, labels, _, _ = sample
    with pytest.raises(kiln.KilnError, match=r"x has shape \[3, 27, 27\]"):
        model.predict(np.zeros((3, 27, 27), np.float32))
    with pytest.raises(kiln.KilnError, match="label 10 at index 0"):
        model.fit(images[:2], np.array([10, 1]))
    with pytest.raises(kiln.KilnError, match="2 labels for 3 images"):
        model.evaluate(images[:3], labels[:2])
    with pytest.raises(kiln.KilnError, match="epochs = 0"):
        model.fit(images[:2], labels[:2], epochs=0)
    with pytest.raises(kiln.KilnError, match="learning rate NaN"):
        model.fit(images[:2], labels[:2], learning_rate=float("nan"))
    with pytest.raises(kiln.KilnError, match="unknown model `nope`"):
        kiln.build("nope")
    with pytest.raises(kiln.KilnError, match="unknown kernel set `sse9`"):
        kiln.build("mlp", kernels="sse9")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(kiln.KilnError, match="truncated"):
        kiln.load(str(bad))
    with pytest.raises(kiln.KilnError, match="reading model file"):
        kiln.load(str(tmp_path / "missing.safetensors"))
    state = model.state_dict()
    del state["2.dense.bias"]
    with pytest.raises(kiln.KilnError, match="the state has no"):
        kiln.build("mlp").load_state_dict(state)
    assert issubclass(kiln.KilnError, Exception)


def test_every_kernel_set_gives_the_same_classes(sample):
    _, _, test_images, _ = sample
    x = test_images[:20].astype(np.float32) / 255
    reference = kiln.build("cnn", seed=1, kernels="scalar").predict(x[:, None])
    best = kiln.build("cnn", seed=1).predict(x[:, None])
    np.testing.assert_allclose(best, reference, atol=1e-5)


def test_float_examples_with_three_channels_train_a_cnn(tmp_path):
    spec = tmp_path / "rgb.toml"
    spec.write_text(
        'name = "rgb"\ninput = [3, 4, 4]\n'
        '[[layers]]\ntype = "conv2d"\nfilters = 8\nkernel_size = 3\nactivation = "relu"\n'
        '[[layers]]\ntype = "flatten"\n'
        '[[layers]]\ntype = "dense"\nunits = 3\nactivation = "softmax"\n'
    )
    n = 90
    x = np.full((n, 3, 4, 4), 0.1, np.float32)
    y = np.arange(n) % 3
    x[np.arange(n), y] = 0.9  # the bright channel is the class
    model = kiln.build(str(spec), seed=2, threads=1)
    model.fit(x, y, epochs=40, batch_size=15, learning_rate=1e-2)
    assert model.evaluate(x, y, batch_size=30)["accuracy"] == 1.0
    assert (model.predict(x).argmax(axis=1) == y).all()
    with pytest.raises(kiln.KilnError, match=r"shape \[3, 4, 4\]|\[3, 4, 4\]"):
        model.fit(np.zeros((2, 3, 5, 5), np.float32), np.array([0, 1]))
