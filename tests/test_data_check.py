"""The data check before training, classes inferred from the data, and masks that mean what
they say: files written here in each source's real layout, read back through the real
loaders, `trainlab data check` and `trainlab train` with its MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICK, runs_of
from trainlab.data.augment import Augmentation
from trainlab.data.check import prepare_data
from trainlab.errors import TrainlabError


def save(path: Path, array: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def class_folders(root: Path, names=("cat", "dog", "fox"), n=5, size=(12, 16)) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        for i in range(n):
            save(root / name / f"{i}.jpg", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def break_files(root: Path) -> list[Path]:
    """A JPEG cut short (its header still reads), and a file that is no image at all."""
    cut = root / "dog" / "1.jpg"
    cut.write_bytes(cut.read_bytes()[:-40])
    junk = root / "fox" / "notes.png"
    junk.write_text("not an image")
    return [cut, junk]


def garble_middle(path: Path) -> Path:
    """Garbage in the middle of a JPEG whose header and end marker stay intact: the fast
    check passes it, decoding fails."""
    import io

    rng = np.random.default_rng(0)
    data = path.read_bytes()
    middle = len(data) // 2
    for _ in range(200):
        garbled = data[:middle] + rng.bytes(200) + data[middle + 200:]
        try:
            Image.open(io.BytesIO(garbled)).load()
        except OSError:
            path.write_bytes(garbled)
            return path
    raise AssertionError(f"no garbage made {path} undecodable")


def decompression_bomb(path: Path) -> Path:
    """A PNG whose header claims 20000x20000 pixels, over PIL's limit; a few bytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(bytes(20001))) + chunk(b"IEND", b""))
    return path


def folder_args(root: Path, *extra: str) -> list[str]:
    return ["data=image_folder", f"data.dataset.root={root}", "data.image_size=[8,8]",
            "data.num_workers=0", "data.batch_size=4", *extra]


def test_image_folder_classes_are_inferred_and_checked(compose, tmp_path):
    root = class_folders(tmp_path / "pets")
    cfg = compose(*folder_args(root))
    assert cfg.data.num_classes is None
    data = prepare_data(cfg, {"data": "image_folder"})
    assert cfg.data.num_classes == 3 and data.splits.class_names == ["cat", "dog", "fox"]
    text = data.report.text()
    assert "classes: 3 (inferred from the data): cat, dog, fox" in text
    assert "no problems found" in text
    with pytest.raises(TrainlabError, match=r"data.num_classes=2 but .*pets has 3 class folders "
                                            r"\(cat, dog, fox\); set data.num_classes=3 or null"):
        prepare_data(compose(*folder_args(root, "data.num_classes=2")), {})


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_every_bad_file_is_reported_at_once_or_skipped(compose, tmp_path, mode):
    root = class_folders(tmp_path / "pets")
    bad = break_files(root)
    with pytest.raises(TrainlabError) as err:
        prepare_data(compose(*folder_args(root, f"data.check={mode}")), {})
    message = str(err.value)
    assert message.startswith("data: 2 problems found before training")
    assert all(str(path) in message for path in bad)
    assert "truncated JPEG" in message or "does not decode" in message
    cfg = compose(*folder_args(root, f"data.check={mode}", "data.skip_bad_files=true"))
    data = prepare_data(cfg, {})
    assert sorted(line.split(":")[0] for line in data.report.skipped) == sorted(map(str, bad))
    assert len(data.splits.train) + len(data.splits.val) == 14
    kept = {path for path, _ in data.splits.train.samples + data.splits.val.samples}
    assert not kept & set(bad)
    bad[1].unlink()  # one left: said in the singular
    with pytest.raises(TrainlabError, match="^data: 1 problem found before training"):
        prepare_data(compose(*folder_args(root, f"data.check={mode}")), {})


def test_csv_labels_and_missing_files_in_one_report(compose, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["file,label"]
    for i in range(8):
        save(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
        rows.append(f"{i}.png,{i % 3}")
    rows += ["gone.png,1", "7.png,5"]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    args = ["data=csv_images", f"data.dataset.root={tmp_path / 'img'}",
            f"data.dataset.csv={tmp_path / 'labels.csv'}", "data.num_classes=3",
            "data.dataset.val_fraction=0.3"]
    with pytest.raises(TrainlabError) as err:
        prepare_data(compose(*args), {})
    message = str(err.value)
    assert message.startswith("data: 2 problems found before training")  # each once
    assert "gone.png: missing" in message
    assert "7.png: label 5 outside 0..2 (data.num_classes=3)" in message
    cfg = compose(*args[:-2], "data.dataset.val_fraction=0.3")
    cfg.data.num_classes = None
    with pytest.raises(TrainlabError, match="gone.png: missing"):
        prepare_data(cfg, {})  # inferred: 6 classes from the largest label, the file still gone


# ------------------------------------------------------------------- segmentation
def write_masks(root: Path, masks: list[np.ndarray], ext="png", images=None, **options) -> Path:
    """Carvana's layout with the given masks; images are noise unless given."""
    rng = np.random.default_rng(1)
    for i, mask in enumerate(masks):
        image = images[i] if images is not None else rng.integers(
            0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
        save(root / "train" / f"car{i}.jpg", image)
        save(root / "train_masks" / f"car{i}_mask.{ext}", mask, **options)
    return root


def seg(root: Path, *extra: str, ext="png") -> list[str]:
    return ["data=segmentation_folder", f"data.dataset.root={root}", "data.num_workers=0",
            f"data.dataset.mask_name='{{stem}}_mask.{ext}'", "data.image_size=[16,16]",
            "data.dataset.val_fraction=0.5", *extra]


def all_masks(data) -> torch.Tensor:
    return torch.stack([data.splits.train[i][1] for i in range(len(data.splits.train))]
                       + [data.splits.val[i][1] for i in range(len(data.splits.val))])


def three_class_mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[2:8, 2:8], mask[9:14, 9:14] = 1, 2
    return mask


def test_multiclass_masks_are_never_merged_and_classes_are_inferred(compose, tmp_path):
    root = write_masks(tmp_path / "a", [three_class_mask()] * 4)
    cfg = compose(*seg(root, "data.num_classes=null", "data.check=full"))
    data = prepare_data(cfg, {})
    assert cfg.data.num_classes == 3 and set(all_masks(data).unique().tolist()) == {0, 1, 2}
    assert "(class columns count mask pixels)" in data.report.text()
    with pytest.raises(TrainlabError, match=r"data.num_classes=null reads the classes from the "
                                            r"masks, which data.check=off skips"):
        prepare_data(compose(*seg(root, "data.num_classes=null", "data.check=off")), {})
    with pytest.raises(TrainlabError, match=r"binarize=true would merge the 3 classes"):
        prepare_data(compose(*seg(root, "data.num_classes=3", "data.dataset.binarize=true")), {})
    with pytest.raises(TrainlabError, match=r"has class 2, outside 0..1 \(data.num_classes=2\); "
                                            r"set data.num_classes, map pixel values with "
                                            r"data.dataset.label_map"):
        prepare_data(compose(*seg(root, "data.num_classes=2", "data.check=full")), {})


def test_mask_values_outside_the_classes_stop_training_before_it_starts(
    trainlab_in_process, compose, mlflow_client, tmp_path
):
    stray = three_class_mask()
    stray[0, 0] = 5
    root = write_masks(tmp_path / "s", [three_class_mask()] * 3 + [stray])
    refused = trainlab_in_process("train", *QUICK, "model=unet", "loss=ce",
                                  *seg(root, "data.num_classes=3"), check=False)
    assert refused.returncode == 1 and "1 problem found before training" in refused.stderr
    assert "car3_mask.png has class 5, outside 0..2 (data.num_classes=3)" in refused.stderr
    assert "(file headers and sizes, mask values; data.check=full" in refused.stderr
    assert mlflow_client.get_experiment_by_name("trainlab") is None or not runs_of(mlflow_client)

    data = prepare_data(compose(*seg(root, "data.num_classes=3", "data.check=off")), {})
    with pytest.raises(TrainlabError, match=r"car3_mask.png has class 5, .*; found while "
                                            r"training: data.check=off skipped the data check"):
        all_masks(data)


def test_class_index_masks_read_as_binary_are_a_problem(trainlab_in_process, tmp_path):
    root = write_masks(tmp_path / "c", [three_class_mask()] * 2)
    checked = trainlab_in_process("data", "check", *seg(root, "data.check=full"), check=False)
    assert checked.returncode == 1 and "no problems found" not in checked.stderr
    assert "masks hold values 1, 2, all below data.dataset.mask_threshold=128, so every pixel " \
           "reads as background: if they are class indices set data.num_classes=3" \
        in checked.stderr
    trainlab_in_process("data", "check", *seg(root, "data.check=full", "data.num_classes=3"))


def test_inferred_classes_of_binary_and_mapped_masks(compose, tmp_path):
    mask = three_class_mask()
    binary = write_masks(tmp_path / "b", [(mask > 0).astype(np.uint8) * 255] * 5)
    (binary / "train_masks" / "car4_mask.png").write_text("unreadable")
    cfg = compose(*seg(binary, "data.num_classes=null", "data.skip_bad_files=true"))
    data = prepare_data(cfg, {})
    assert cfg.data.num_classes == 1 and data.splits.class_names == ["background", "foreground"]
    assert "classes: 1 (inferred from the data, binary: one logit): background, foreground" \
        in data.report.text()
    assert set(all_masks(data).unique().tolist()) == {0, 1}
    assert [line.split(":")[0] for line in data.report.skipped] == [
        str(binary / "train" / "car4.jpg")]

    grey = mask * 100
    grey[0] = 255  # a border to leave out
    mapped = write_masks(tmp_path / "m", [grey] * 4)
    cfg = compose(*seg(mapped, "data.num_classes=null", "data.ignore_index=255",
                       "data.dataset.label_map={0: 0, 100: 1, 200: 2, 255: 255}"))
    data = prepare_data(cfg, {})
    assert cfg.data.num_classes == 3 and set(all_masks(data).unique().tolist()) == {0, 1, 2, 255}


def test_lossy_binary_masks_keep_their_area(compose, tmp_path):
    """A 0/255 mask saved as JPEG: ringing around the edge must not grow the mask."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    root = write_masks(tmp_path / "j", [mask] * 2, ext="jpg", quality=70)
    stored = np.asarray(Image.open(root / "train_masks" / "car0_mask.jpg"))
    assert ((stored > 0) & (stored < 255)).any()  # really lossy
    data = prepare_data(compose(*seg(root, "data.image_size=[64,64]", ext="jpg")), {})
    area = all_masks(data).float().sum(dim=(1, 2)) / (32 * 24)
    assert torch.all((area - 1).abs() < 0.03)
    # classes cannot be read from them: inferring is refused, not 200-odd classes
    with pytest.raises(TrainlabError, match=r"data.num_classes=null: masks such as .*car\d_mask"
                       r".jpg are JPEG, whose compression leaves \d+ distinct values"):
        prepare_data(compose(*seg(root, "data.num_classes=null", ext="jpg")), {})


def test_colour_masks_map_through_the_palette(compose, tmp_path):
    colours = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    mask = np.array(colours, dtype=np.uint8)[three_class_mask()]
    root = write_masks(tmp_path / "rgb", [mask] * 2)
    palette = "data.dataset.palette=[[0,0,0],[128,0,0],[0,128,0]]"
    data = prepare_data(compose(*seg(root, "data.num_classes=null", palette)), {})
    labels = all_masks(data)
    assert data.report.num_classes == 3
    assert torch.equal(labels[0], torch.from_numpy(three_class_mask()).long())
    with pytest.raises(TrainlabError, match=r"is an RGB colour image; list the class colours "
                                            r"in data.dataset.palette"):
        data = prepare_data(compose(*seg(root, "data.num_classes=3", "data.check=full")), {})
    with pytest.raises(TrainlabError, match=r"colours \[\(0, 128, 0\)\] that "
                                            r"data.dataset.palette does not list"):
        prepare_data(compose(*seg(root, "data.num_classes=2", "data.check=full",
                                  "data.dataset.palette=[[0,0,0],[128,0,0]]")), {})

    # VOC's palette PNGs: indices whose colours the file's own palette gives
    indexed = Image.fromarray(three_class_mask()[::-1].copy(), mode="P")
    indexed.putpalette([0, 0, 0, 0, 128, 0, 128, 0, 0])  # index 1 green, index 2 red
    voc = tmp_path / "voc"
    save(voc / "train" / "car0.jpg", np.zeros((16, 16, 3), np.uint8))
    save(voc / "train" / "car1.jpg", np.zeros((16, 16, 3), np.uint8))
    (voc / "train_masks").mkdir()
    for i in range(2):
        indexed.save(voc / "train_masks" / f"car{i}_mask.png")
    data = prepare_data(compose(*seg(voc, "data.num_classes=null", palette)), {})
    expected = np.array([0, 2, 1])[three_class_mask()[::-1]]  # green is class 2, red 1
    assert data.report.num_classes == 3
    assert torch.equal(all_masks(data)[0], torch.from_numpy(expected).long())


def test_missing_and_mismatched_masks_are_listed_and_skipped(compose, tmp_path):
    root = write_masks(tmp_path / "m", [np.zeros((16, 16), np.uint8)] * 4)
    (root / "train_masks" / "car1_mask.png").unlink()
    save(root / "train_masks" / "car2_mask.png", np.zeros((8, 16), np.uint8))
    with pytest.raises(TrainlabError) as err:
        prepare_data(compose(*seg(root)), {})
    message = str(err.value)
    assert "car1.jpg: has no mask" in message and "data.dataset.mask_name" in message
    assert "car2.jpg: its mask" in message and "is 16x8, the image 16x16" in message
    data = prepare_data(compose(*seg(root, "data.skip_bad_files=true")), {})
    assert len(data.report.skipped) == 2
    assert len(data.splits.train) + len(data.splits.val) == 2
    (root / "train_masks" / "car3_mask.png").write_text("not a mask")
    with pytest.raises(TrainlabError) as err:
        prepare_data(compose(*seg(root, "data.check=full")), {})
    message = str(err.value)  # each bad file once, though full also reads mask values
    assert message.startswith("data: 3 problems found before training")
    for mask in ("car1_mask.png", "car3_mask.png"):
        assert len([line for line in message.splitlines() if mask in line]) == 1


def test_segmentation_images_are_the_image_files_of_the_folder(compose, tmp_path):
    root = write_masks(tmp_path / "n", [three_class_mask()] * 2)
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "README.txt").write_text("cars, photographed in 2017")
    data = prepare_data(compose(*seg(root, "data.num_classes=3")), {})
    assert "no problems found" in data.report.text()
    assert sorted(image.name for image, _ in data.splits.train.pairs + data.splits.val.pairs) \
        == ["car0.jpg", "car1.jpg"]


def test_sixteen_bit_images_and_exif_orientation(compose, tmp_path):
    """A 16-bit grey ramp is scaled by 65535, not clipped at 255; a photo stored sideways
    with an EXIF orientation tag is turned upright, and so is its size check."""
    ramp = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    save(tmp_path / "gray" / "a" / "0.png", ramp)
    save(tmp_path / "gray" / "b" / "0.png", ramp)
    data = prepare_data(compose("data=image_folder", f"data.dataset.root={tmp_path / 'gray'}",
                                "data.in_channels=1", "data.image_size=[16,16]",
                                "data.dataset.val_fraction=0.5"), {})
    image = data.splits.train[0][0][0]
    assert abs(float(image.max()) - 1.0) < 0.02 and float(image.mean()) == pytest.approx(
        0.5, abs=0.03)

    upright = np.zeros((16, 24, 3), dtype=np.uint8)
    upright[:4] = 255  # a bright top band
    sideways = np.ascontiguousarray(np.rot90(upright, 1))  # stored turned, 24x16
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[:4] = 1
    root = tmp_path / "exif"
    for i in range(2):
        save(root / "train" / f"car{i}.jpg", sideways, exif=exif.tobytes(), quality=95)
        save(root / "train_masks" / f"car{i}_mask.png", mask)
    data = prepare_data(compose(*seg(root, "data.image_size=[16,24]")), {})
    image, labels = data.splits.train[0]
    assert image.mean(0)[:4].mean() > 0.9 and image.mean(0)[6:].mean() < 0.1
    assert torch.equal(labels, torch.from_numpy(mask).long())


def test_augmentation_fills_masks_outside_the_image_with_ignore_index():
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    images = torch.rand(4, 3, 32, 32)
    shift = {"_target_": "imgaug.augmenters.Affine", "translate_px": {"x": 6}}
    out_masks = Augmentation(shift, ignore_index=255)(images, masks)[1]
    assert (out_masks[:, :, :6] == 255).all() and set(out_masks.unique().tolist()) == {0, 1, 255}
    assert (Augmentation(shift)(images, masks)[1][:, :, :6] == 0).all()  # unset: class 0


@pytest.mark.parametrize(("pipeline", "task", "message"), [
    ({"_target_": "imgaug.augmenters.Crop", "px": [0, 4], "keep_size": False}, "classification",
     r"^augment: Crop changes the image size.*set keep_size: true, or wrap it in "
     r"imgaug.augmenters.KeepSizeByResize$"),
    ({"_target_": "imgaug.augmenters.Sequential", "children": [
        {"_target_": "imgaug.augmenters.Fliplr"}, {"_target_": "imgaug.augmenters.RandAugment"}]},
     "segmentation", r"^augment: RandAugment changes images only .* segmentation data"),
    ({"_target_": "imgaug.augmenters.pillike.Affine", "rotate": [-5, 5]}, "segmentation",
     r"^augment: pillike.Affine .* use imgaug.augmenters.Affine"),
    ({"_target_": "imgaug.augmenters.Sometimes", "p": 0.02, "then_list": [  # rarely: mid-run
        {"_target_": "imgaug.augmenters.Affine", "rotate": [-30, 30], "fit_output": True}]},
     "classification", r"^augment: Affine changes the image size.*; set fit_output: false, or "
                       r"wrap it in imgaug.augmenters.KeepSizeByResize$"),
    ({"_target_": "imgaug.augmenters.Resize", "size": 0.5}, "segmentation",
     r"^augment: Resize changes the image size.*; wrap it in imgaug.augmenters.KeepSizeByResize"),
])
def test_augmenters_are_checked_against_the_task(compose, pipeline, task, message):
    data = "shapes" if task == "segmentation" else "digits"
    cfg = compose(f"data={data}", "augment=light")
    cfg.augment.pipeline = pipeline
    with pytest.raises(TrainlabError, match=message) as err:
        prepare_data(cfg, {})
    assert "\n" not in str(err.value)
    cfg.augment.pipeline = {"_target_": "imgaug.augmenters.KeepSizeByResize",
                            "children": pipeline} if task == "classification" else None
    prepare_data(cfg, {})  # the fix the message names works


# ---------------------------------------------------------------- whole workflows
def test_data_check_command_lists_every_problem(run_trainlab, tmp_path):
    root = class_folders(tmp_path / "pets")
    bad = break_files(root)
    failed = run_trainlab("data", "check", "data=image_folder", f"data.dataset.root={root}",
                          check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "classes: 3 (inferred from the data): cat, dog, fox" in failed.stderr
    assert all(str(path) in failed.stderr for path in bad)


@pytest.mark.slow
def test_training_refuses_bad_data_before_mlflow_and_logs_what_it_skipped(
    run_trainlab, mlflow_client, tmp_path
):
    root = class_folders(tmp_path / "pets", size=(8, 8))
    bad = break_files(root)
    args = [*QUICK, "trainer.max_epochs=1", "data=image_folder", f"data.dataset.root={root}",
            "data.image_size=[8,8]", "data.num_workers=0", "data.batch_size=4"]
    failed = run_trainlab("train", *args, check=False)
    assert failed.returncode == 1 and "2 problems found before training" in failed.stderr
    assert mlflow_client.get_experiment_by_name("trainlab") is None or not runs_of(mlflow_client)
    run_trainlab("train", *args, "data.skip_bad_files=true")
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.skipped_files"] == "2"
    assert run.data.params["data.num_classes"] == "3"  # inferred, and what the model was built with
    local = mlflow_client.download_artifacts(run.info.run_id, "data/skipped_files.txt",
                                             str(tmp_path))
    assert sorted(line.split(":")[0] for line in Path(local).read_text().splitlines()) == sorted(
        map(str, bad))


@pytest.mark.slow
def test_a_file_that_fails_only_while_training_is_skipped_or_named_with_the_full_check(
    trainlab_in_process, mlflow_client, tmp_path
):
    root = class_folders(tmp_path / "pets", size=(32, 32))
    bad = garble_middle(root / "fox" / "3.jpg")
    args = ["train", *QUICK, "logger.log_model=none", *folder_args(root)]
    failed = trainlab_in_process(*args, check=False)
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and str(bad) in line and "found while training" in line
    assert "data.check=fast reads file headers only: data.check=full decodes every file " \
           "before training, and data.skip_bad_files=true skips what it finds" in line
    full = trainlab_in_process("data", "check", *folder_args(root, "data.check=full"),
                               check=False)
    assert full.returncode == 1 and f"{bad}: does not decode" in full.stderr

    trained = trainlab_in_process(*args, "data.skip_bad_files=true")
    skipped = [line for line in trained.stderr.splitlines() if line.startswith("data: skipped")]
    assert skipped == [f"data: skipped {bad} (broken data stream when reading image file), "
                       "found while training (data.skip_bad_files=true): the next readable "
                       "sample takes its place"]  # once, over both epochs
    assert "set data.skip_bad_files" not in trained.stderr
    assert runs_of(mlflow_client)[-1].info.status == "FINISHED"


def test_a_decompression_bomb_is_a_bad_file_like_any_other(trainlab_in_process, tmp_path):
    root = class_folders(tmp_path / "pets")
    bomb = decompression_bomb(root / "cat" / "huge.png")
    for mode in ("fast", "full"):
        refused = trainlab_in_process("data", "check", *folder_args(root, f"data.check={mode}"),
                                      check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"{bomb}: not a readable image (Image size (400000000 pixels) exceeds limit" \
            in refused.stderr
        skipped = trainlab_in_process("data", "check", *folder_args(
            root, f"data.check={mode}", "data.skip_bad_files=true")).stdout
        assert "skipped 1 file (data.skip_bad_files=true)" in skipped and str(bomb) in skipped


@pytest.mark.slow
def test_predict_writes_upright_masks_and_skips_a_decompression_bomb(
    trainlab_in_process, mlflow_client, tmp_path
):
    """A photo stored sideways with an EXIF orientation gets its mask the way it is shown."""
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    root = write_masks(tmp_path / "seg", [mask] * 4)
    trainlab_in_process("train", "model=unet", "loss=dice", "model.base_channels=4",
                        "model.depth=1",
                        "trainer.max_epochs=1", "trainer.progress_bar=false",
                        "logger.log_model=none", *seg(root))
    (run,) = runs_of(mlflow_client)
    photos = tmp_path / "photos"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24 wide, 16 high; shown 16 wide, 24 high
    save(photos / "sideways.jpg", np.zeros((16, 24, 3), np.uint8), exif=exif.tobytes())
    bomb = decompression_bomb(photos / "huge.png")
    out = trainlab_in_process("predict", f"run_id={run.info.run_id}", f"input={photos}",
                              f"output={tmp_path / 'masks'}")
    assert "wrote predictions for 1 image" in out.stdout and "skipped 1 unreadable file" \
        in out.stdout
    assert Image.open(tmp_path / "masks" / "sideways.png").size == (16, 24)
    assert str(bomb) in (tmp_path / "masks" / "skipped.txt").read_text()


@pytest.mark.parametrize("loss", ["ce", "nll", "dice", "focal"])
@pytest.mark.parametrize("classes", [2, 3])
def test_multiclass_losses_fit_segmentation_folder(compose, loss, classes):
    from trainlab.losses import build_loss

    cfg = compose("data=segmentation_folder", f"loss={loss}", f"data.num_classes={classes}")
    assert cfg.data.ignore_index is None
    build_loss(cfg.loss, loss, cfg.data)  # checks itself on a batch shaped like this data


@pytest.mark.slow
def test_cross_entropy_trains_on_segmentation_folder(run_trainlab, mlflow_client, tmp_path):
    masks = [np.roll(three_class_mask(), i, axis=1) for i in range(6)]
    root = write_masks(tmp_path / "seg", masks)
    run_trainlab("train", "model=unet", "loss=ce", "trainer.max_epochs=1",
                 "trainer.progress_bar=false", *seg(root, "data.num_classes=3", "data.batch_size=3",
                                                    "augment=seg", "data.ignore_index=255"),
                 "model.base_channels=4", "model.depth=2")
    (run,) = runs_of(mlflow_client)
    assert run.info.status == "FINISHED" and "val/iou" in run.data.metrics


def test_preview_colours_each_class_and_greys_ignored_pixels():
    from trainlab.data.preview import mask_overlay

    mask = np.array([[0, 1, 2, 255]])
    overlay = mask_overlay(mask, ignore_index=255)
    assert overlay[0, 0, 3] == 0  # background stays clear
    assert tuple(overlay[0, 1, :3]) == (1.0, 0.0, 0.0)  # the binary foreground is red
    assert len({tuple(overlay[0, i, :3]) for i in (1, 2, 3)}) == 3  # classes apart, ignore grey
