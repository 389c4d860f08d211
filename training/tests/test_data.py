import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from training.recipe.data import BATCH_DIR, TARBALL, CifarDataError, channel_stats, dataset_label, load_cifar10, locate


@pytest.fixture(scope="module")
def from_directory(data_dir):
    return load_cifar10(data_dir / BATCH_DIR)


def test_batch_directory_has_the_official_shapes_and_balanced_classes(from_directory):
    train, test = from_directory
    assert train.images.shape == (50000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_tarball_gives_the_same_arrays_as_the_directory(data_dir, from_directory):
    train, test = load_cifar10(data_dir / TARBALL)
    assert np.array_equal(train.images, from_directory[0].images)
    assert np.array_equal(test.labels, from_directory[1].labels)


def test_a_data_dir_prefers_the_extracted_batches(data_dir):
    assert locate(data_dir) == data_dir / BATCH_DIR


def test_train_statistics_are_the_official_ones_documented_in_shared(from_directory):
    mean, std = channel_stats(from_directory[0].images)
    assert np.allclose(mean, [125.307, 122.950, 113.865], atol=0.001)
    assert np.allclose(std, [62.993, 62.089, 66.705], atol=0.001)


def test_channel_statistics_are_the_mean_and_std_of_every_pixel_value_of_each_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels of different spread
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3).astype(np.float64)
    assert np.allclose(mean, pixels.mean(axis=0), rtol=1e-12) and np.allclose(std, pixels.std(axis=0), rtol=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        channel_stats(images.astype(np.float32))


def test_images_are_rgb_in_channel_last_order(from_directory):
    # Sky in airplane pictures is bluer than it is red: the channels were not scrambled.
    train, _ = from_directory
    planes = train.images[train.labels == 0]
    assert planes[..., 2].mean() > planes[..., 0].mean() + 10


def test_the_dataset_label_says_which_copy_was_used(data_dir, tmp_path):
    assert dataset_label(tmp_path) == "CIFAR-10"
    (tmp_path / "DATASET.txt").write_text("CIFAR-10 (JPEG copy)\n")
    assert dataset_label(tmp_path / BATCH_DIR) == "CIFAR-10 (JPEG copy)"


@pytest.fixture
def batch_copy(data_dir, tmp_path):
    """A writable copy of the real batch directory."""
    copy = tmp_path / BATCH_DIR
    shutil.copytree(data_dir / BATCH_DIR, copy)
    return copy


def test_a_truncated_batch_names_the_file(batch_copy):
    victim = batch_copy / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CifarDataError, match="data_batch_3"):
        load_cifar10(batch_copy)


def test_a_missing_batch_names_the_file(batch_copy):
    (batch_copy / "test_batch").unlink()
    with pytest.raises(CifarDataError, match="test_batch: missing"):
        load_cifar10(batch_copy)


def test_zero_byte_and_garbage_batches_are_refused(batch_copy):
    (batch_copy / "data_batch_1").write_bytes(b"")
    with pytest.raises(CifarDataError, match="data_batch_1"):
        load_cifar10(batch_copy)
    (batch_copy / "data_batch_1").write_bytes(b"\x89PNG not a pickle at all")
    with pytest.raises(CifarDataError, match="data_batch_1"):
        load_cifar10(batch_copy)


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle would run code",))


def test_a_pickle_that_would_run_code_is_refused(batch_copy, capsys):
    (batch_copy / "data_batch_2").write_bytes(pickle.dumps({"data": RunsCode()}, protocol=2))
    with pytest.raises(CifarDataError, match=r"forbidden global \w+\.print"):
        load_cifar10(batch_copy)
    assert "would run code" not in capsys.readouterr().out


def test_wrong_shapes_are_explained(batch_copy):
    bad = {b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}
    (batch_copy / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(CifarDataError, match=r"data_batch_4: data must be uint8 \[N, 3072\]"):
        load_cifar10(batch_copy)


def test_a_truncated_tarball_names_the_archive(data_dir, tmp_path):
    broken = tmp_path / TARBALL
    broken.write_bytes((data_dir / TARBALL).read_bytes()[:5_000_000])
    with pytest.raises(CifarDataError, match=f"{TARBALL}: truncated or corrupt"):
        load_cifar10(broken)


def test_a_tarball_without_cifar_inside_is_explained(tmp_path):
    archive = tmp_path / TARBALL
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("something/else.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CifarDataError, match=f"has no {BATCH_DIR}/data_batch_1"):
        load_cifar10(archive)


def test_an_empty_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(CifarDataError, match="make data"):
        load_cifar10(tmp_path)


def test_the_cli_reports_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from training.tests.conftest import REPO
    result = subprocess.run([sys.executable, "-m", "training.recipe.data", "stats", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
