"""Image folders: the weights' own preprocessing, and bad data named before training starts."""

from __future__ import annotations

import pytest
import torch
from conftest import image_folder
from PIL import Image

from teaching_small_cnn.data import DataError, image_folder_datasets, image_transforms, make_datasets
from teaching_small_cnn.model import preprocessing


def test_validation_preprocessing_is_the_weights_own():
    prep = preprocessing()
    _, val = image_transforms(32, augment=False)
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    x = val(image)
    assert x.shape == (3, 32, 32)
    # Undo the normalisation: the pixels must come back within [0, 1].
    mean, std = torch.tensor(prep["mean"])[:, None, None], torch.tensor(prep["std"])[:, None, None]
    pixels = x * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_an_image_folder_trains_with_augmentation(tmp_path, config):
    root = image_folder(tmp_path / "images", classes=config.model.num_classes)
    train, val = make_datasets(str(root), config)
    x, y = train[0]
    assert x.shape == (3, config.train.image_size, config.train.image_size) and y == 0
    assert len(train) == len(val) == 2 * config.model.num_classes


def test_a_missing_folder_is_named(tmp_path, config):
    with pytest.raises(DataError, match="no such directory"):
        make_datasets(str(tmp_path / "nowhere"), config)
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"half/val is not a directory"):
        make_datasets(str(tmp_path / "half"), config)


def test_an_empty_class_folder_is_an_error_or_skipped_with_a_warning(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    (root / "train" / "class2").mkdir()
    (root / "val" / "class2").mkdir()
    (root / "val" / "class2" / "0.png").write_bytes((root / "val" / "class0" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"train/class2 holds no images.*bad_images = \"skip\""):
        image_folder_datasets(root, 32, 3)
    train, _ = image_folder_datasets(root, 32, 3, bad_images="skip")
    assert "warning:" in capsys.readouterr().err and train.classes == ["class0", "class1", "class2"]
    assert len(train) == 4


def test_an_unreadable_image_is_named_or_skipped(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    broken = root / "train" / "class1" / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken\.png"):
        image_folder_datasets(root, 32, 2)
    train, _ = image_folder_datasets(root, 32, 2, bad_images="skip")
    assert "broken.png" in capsys.readouterr().err
    assert len(train) == 4 and all(str(broken) != path for path, _ in train.samples)
    with pytest.raises(DataError, match='bad_images must be "error" or "skip"'):
        image_folder_datasets(root, 32, 2, bad_images="ignore")
