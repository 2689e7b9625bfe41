"""Image folders: the weights' own preprocessing, and bad data named before training starts."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from conftest import image_folder, to_toml
from PIL import Image

from resnet18_pattern.cli import main
from resnet18_pattern.data import DataError, image_folder_datasets, image_transforms, make_datasets
from resnet18_pattern.model import preprocessing
from resnet18_pattern.train import fit


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
    from torchvision.models import get_model_weights

    from resnet18_pattern.model import ARCH

    # At the weights' own crop size, the same tensor as torchvision's transforms.
    reference = get_model_weights(ARCH).DEFAULT.transforms()
    _, val = image_transforms(reference.crop_size[0], augment=False)
    assert torch.allclose(val(image), reference(image), atol=1e-6)


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


def broken_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a PNG with corrupt pixel data but valid chunk CRCs: both pass Image.verify()."""
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    jpeg, png = folder / "cut.jpg", folder / "garbled.png"
    Image.fromarray(pixels.numpy()).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 6 // 10])
    Image.fromarray(pixels.numpy()).save(png)
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT")  # 4-byte length before it, data after it, then the CRC
    length = int.from_bytes(data[start - 4 : start], "big")
    data[start + 20 : start + 40] = bytes(20)
    data[start + 4 + length : start + 8 + length] = zlib.crc32(data[start : start + 4 + length]).to_bytes(4, "big")
    png.write_bytes(bytes(data))
    for path in (jpeg, png):
        with Image.open(path) as image:
            image.verify()  # what a header-only check would let through
    return [jpeg, png]


def test_images_that_only_fail_when_decoded_are_caught_before_training(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    broken = broken_images(root / "train" / "class1")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*cut\.jpg.*garbled\.png"):
        image_folder_datasets(root, 32, 2)
    train, _ = image_folder_datasets(root, 32, 2, bad_images="skip")
    assert "2 unreadable" in capsys.readouterr().err
    assert len(train) == 4 and not {str(p) for p in broken} & {path for path, _ in train.samples}


def test_a_16_bit_png_and_a_float_tiff_are_refused_by_name_not_saturated(tmp_path):
    root = image_folder(tmp_path / "images")
    gradient = torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) * 16  # 0..65520: 16 bits
    Image.fromarray(gradient.numpy().astype("uint16")).save(root / "train" / "class0" / "deep.png")
    Image.fromarray((gradient / 65535).numpy().astype("float32")).save(root / "train" / "class1" / "float.tif")
    for path in ("deep.png", "float.tif"):  # PIL's RGB of each: nearly every pixel at 255, or only 0 and 1
        with Image.open(next(root.rglob(path))) as image:
            assert image.mode in ("I;16", "I", "F")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*deep\.png \(.*not 8 bits.*float\.tif"):
        image_folder_datasets(root, 32, 2)


def one_folder(root, config, per_class: int = 5):
    """root/<class>/*.png, no train/ or val/: what a user has before splitting."""
    image_folder(root / "tmp", classes=config.model.num_classes, per_class=per_class)
    (root / "tmp" / "train").rename(root / "all")
    return root / "all"


def test_a_one_folder_dataset_is_split_stratified_disjoint_and_reproducible(tmp_path, config):
    root = one_folder(tmp_path, config)
    config.data.val_fraction = 0.4
    train, val = make_datasets(str(root), config)
    split = train.split
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == 5 * config.model.num_classes
    per_class = [sum(name.startswith(f"class{c}/") for name in split["val"]) for c in range(config.model.num_classes)]
    assert per_class == [2] * config.model.num_classes  # round(5 x 0.4) of every class
    assert len(val) == len(split["val"]) and val[0][0].shape[-1] == config.train.image_size
    assert make_datasets(str(root), config)[0].split == split, "the same seed must give the same split"
    config.train.seed += 1
    assert make_datasets(str(root), config)[0].split != split


def test_a_class_too_small_to_split_is_named(tmp_path, config):
    root = one_folder(tmp_path, config)
    for path in sorted((root / "class1").iterdir())[1:]:
        path.unlink()
    with pytest.raises(DataError, match=r"class1 has 1 image\(s\); a class needs 2 or more"):
        make_datasets(str(root), config)


def test_a_folder_that_does_not_fit_the_model_is_one_line(tmp_path, config):
    with pytest.raises(DataError, match="holds no class folders"):
        make_datasets(str(image_folder(tmp_path / "flat", classes=1) / "train" / "class0"), config)
    root = image_folder(tmp_path / "few", classes=config.model.num_classes - 1, per_class=2) / "train"
    with pytest.raises(DataError, match=f"has {config.model.num_classes - 1} classes but the model has"):
        make_datasets(str(root), config)


def test_a_run_keeps_its_split_and_evaluate_validates_on_it(tmp_path, config, capsys):
    root = one_folder(tmp_path, config)
    # 0.5 of 5 images is 2 a class; a split made anew after one more image would take 3.
    config.data.val_fraction = 0.5
    out = tmp_path / "run"
    fit(config, out, data=str(root), epochs=2, stop_after=1, device="cpu")
    split = json.loads((out / "split.json").read_text())
    # New images arrive: they belong to neither side of the run that began without them.
    for c in range(config.model.num_classes):
        (root / f"class{c}" / "new.png").write_bytes((root / f"class{c}" / "0.png").read_bytes())
    fit(None, None, data=str(root), resume=out, device="cpu")
    assert json.loads((out / "split.json").read_text()) == split
    config_file = tmp_path / "small.toml"
    config_file.write_text(to_toml(config))
    weights = out / "best.safetensors"
    capsys.readouterr()
    args = ["--config", str(config_file), "evaluate", "--weights", str(weights), "--data", str(root), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(row["images"] for row in report["per_class"]) == len(split["val"])


def test_a_link_in_a_class_folder_that_loops_or_leaves_it_is_refused_by_name(tmp_path, config):
    root = image_folder(tmp_path / "images", classes=config.model.num_classes)
    cat = root / "train" / "class0"
    (cat / "up").symlink_to("..")  # every class again, labelled class0
    with pytest.raises(DataError, match=r"class0/up is a loop back to a folder above it"):
        make_datasets(str(root), config)
    (cat / "up").unlink()
    (cat / "other.png").symlink_to(root / "train" / "class1" / "0.png")
    with pytest.raises(DataError, match=r"class0/other.png is a link to .*, outside its class folder"):
        make_datasets(str(root), config)
    (cat / "other.png").unlink()
    (cat / "again.png").symlink_to("0.png")  # a link that stays in its class folder is an image like any other
    assert len(make_datasets(str(root), config)[0]) == 2 * config.model.num_classes + 1


def test_a_run_records_its_data_and_evaluate_run_uses_it(tmp_path, config, capsys):
    root = image_folder(tmp_path / "images", classes=config.model.num_classes)
    out = tmp_path / "run"
    fit(config, out, data=str(root), epochs=1, device="cpu")
    record = json.loads((out / "data.json").read_text())
    assert record["data"] == str(root.resolve()) and record["train"]["images"] == 2 * config.model.num_classes
    capsys.readouterr()
    # No --data: the run's own, not synthetic (whose class names differ).
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"][0]["class"] == "class0"
    (root / "val" / "class0" / "0.png").write_bytes((root / "val" / "class1" / "0.png").read_bytes() + b"x")
    assert main(["evaluate", "--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has changed since the run" in err and err.count("\n") == 1, err


def test_a_resume_trains_on_the_run_s_data_and_refuses_other_data(tmp_path, config, capsys):
    root = image_folder(tmp_path / "images", classes=config.model.num_classes)
    other = image_folder(tmp_path / "other", classes=config.model.num_classes, per_class=3)
    out = tmp_path / "run"
    fit(config, out, data=str(root), epochs=3, stop_after=1, device="cpu")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {out}" in err and "was trained on" in err and err.count("\n") == 1, err
    # The same file names, counts and classes, other pixels: other data all the same.
    twin = shutil.copytree(root, tmp_path / "twin")
    first, second = twin / "train" / "class0" / "0.png", twin / "train" / "class0" / "1.png"
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    assert main(["train", "--resume", str(out), "--data", str(twin)]) == 2
    assert "was trained on" in capsys.readouterr().err
    # What a stopped run prints, `continue with --resume RUN`, is all a resume needs.
    assert main(["train", "--resume", str(out), "--stop-after", "1"]) == 0
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 1
    assert main(["train", "--resume", str(out), "--data", str(root)]) == 0


def test_an_edited_split_is_refused_on_resume(tmp_path, config, capsys):
    root = one_folder(tmp_path, config)
    out = tmp_path / "run"
    fit(config, out, data=str(root), epochs=2, stop_after=1, device="cpu")
    split = json.loads((out / "split.json").read_text())
    split["train"] += split["val"]  # the validation images train too
    (out / "split.json").write_text(json.dumps(split))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "an edited split.json" in err and err.count("\n") == 1, err


def config_leaving_the_count(tmp_path: Path, config) -> list[str]:
    """--config of `config` without model.num_classes: what a user who never edited the count passes."""
    path = tmp_path / "no_count.toml"
    path.write_text("".join(line for line in to_toml(config).splitlines(True) if not line.startswith("num_classes")))
    return ["--config", str(path)]


def test_train_takes_the_folder_s_class_count_when_no_config_gives_it(tmp_path, config, capsys):
    count = config.model.num_classes + 1  # not the packaged count
    root = image_folder(tmp_path / "images", classes=count)
    given, out = config_leaving_the_count(tmp_path, config), tmp_path / "run"
    epochs = ["--epochs", "2", "--stop-after", "1"]
    assert main([*given, "train", "--data", str(root), *epochs, "--out", str(out), "--device", "cpu"]) == 0
    # The run records the count it used: evaluate (and predict, export, resume) build the same head.
    assert f"num_classes = {count}\n" in (out / "config.toml").read_text()
    assert main(["evaluate", "--run", str(out), "--device", "cpu"]) == 0
    lr_find = ["lr-find", "--data", str(root), "--out", str(tmp_path / "lr"), "--steps", "20", "--device", "cpu"]
    assert main([*given, *lr_find]) == 0
    # A resume with a --config that leaves the count out trains on with the run's.
    assert main([*given, "train", "--resume", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    # A count the user gives is kept, and a folder that disagrees is refused in one line naming both.
    explicit = [*given, "--set", f"model.num_classes={count + 1}", "train", "--data", str(root)]
    assert main([*explicit, "--out", str(tmp_path / "other"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"has {count} classes but the model has num_classes = {count + 1}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "other").exists()


def test_a_folder_of_one_class_is_one_line_before_anything_is_written(tmp_path, config, capsys):
    root = image_folder(tmp_path / "images", classes=1)
    args = [*config_leaving_the_count(tmp_path, config), "train", "--data", str(root), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds only" in err and "a classifier needs 2 or more" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
