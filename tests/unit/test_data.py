"""Zero-shot feature tasks: SA-DVAE folders, split files, validation classes, the generated task; one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_feature_folder

from trainers.configs import DataConfig
from trainers.data import (
    EMBEDDED_UNSEEN,
    carve_validation,
    generate_synthetic_task,
    load_class_ids,
    load_feature_task,
    resolve_split,
)
from trainers.errors import InputError

NUM_CLASSES = 12
UNSEEN = [2, 7]


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_feature_folder(tmp_path / "shift_toy_2_r", num_classes=NUM_CLASSES, unseen=UNSEEN)


def data_cfg(folder: Path, **kw) -> DataConfig:
    return DataConfig(source="features", features_dir=folder, **{"val_unseen": 2, **kw})


def load_error(cfg: DataConfig, num_classes: int = NUM_CLASSES, **kw) -> str:
    """The message of the InputError that loading raises; always a single line."""
    with pytest.raises(InputError) as err:
        load_feature_task(cfg, num_classes, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def save(path: Path, arr) -> Path:
    np.save(path, np.asarray(arr))
    return path


# ----------------------------------------------------------------------------------------------
# SA-DVAE folders
# ----------------------------------------------------------------------------------------------

def test_loads_sa_dvae_folder(folder):
    task = load_feature_task(data_cfg(folder), NUM_CLASSES)
    assert task.name == "shift_toy_2_r" and task.num_classes == NUM_CLASSES and task.feature_dim == 16
    assert task.unseen == UNSEEN                              # default: z_label's classes
    assert task.seen == [c for c in range(NUM_CLASSES) if c not in UNSEEN]
    assert len(task.train) == 100 and len(task.test) == 20
    assert task.train.features.dtype == torch.float32 and task.train.labels.dtype == torch.int64
    assert len(task.val) == 2 and set(task.val) <= set(task.seen)


def test_tuning_and_final_splits(folder):
    task = load_feature_task(data_cfg(folder), NUM_CLASSES)
    fit, val, fit_classes = task.tuning_split()
    assert set(fit.labels.tolist()) == set(fit_classes) == set(task.seen) - set(task.val)
    assert set(val.labels.tolist()) == set(task.val)
    assert len(fit) + len(val) == len(task.train)
    _, test, classes = task.final_split()
    assert classes == task.seen and set(test.labels.tolist()) == set(task.unseen)


def test_split_files_are_used(folder, tmp_path):
    cfg = data_cfg(folder, unseen=save(tmp_path / "ru.npy", UNSEEN),
                   seen=save(tmp_path / "rs.npy", [c for c in range(NUM_CLASSES) if c not in UNSEEN]),
                   val_unseen=save(tmp_path / "rv.npy", [9, 0]))
    task = load_feature_task(cfg, NUM_CLASSES)
    assert task.unseen == UNSEEN and task.val == [0, 9]


def test_float_labels_with_integer_values_are_accepted(folder):
    save(folder / "train_label.npy", np.load(folder / "train_label.npy").astype(np.float64))
    task = load_feature_task(data_cfg(folder), NUM_CLASSES)
    assert task.train.labels.dtype == torch.int64


@pytest.mark.parametrize("name", ["train.npy", "train_label.npy", "ztest.npy", "z_label.npy"])
def test_missing_file_names_it(folder, name):
    (folder / name).unlink()
    assert load_error(data_cfg(folder)).startswith(f"{folder / name}: missing")


def test_missing_folder_names_it(tmp_path):
    assert "nowhere: features folder not found" in load_error(data_cfg(tmp_path / "nowhere"))
    assert "data.features_dir" in load_error(DataConfig(source="features"))


def test_one_dimensional_features(folder):
    save(folder / "train.npy", np.load(folder / "train.npy").ravel())
    msg = load_error(data_cfg(folder))
    assert msg.startswith(f"{folder / 'train.npy'}:") and "2-D" in msg


def test_two_dimensional_labels(folder):
    save(folder / "z_label.npy", np.load(folder / "z_label.npy")[:, None])
    assert load_error(data_cfg(folder)).startswith(f"{folder / 'z_label.npy'}: expected a 1-D array")


def test_label_count_mismatch(folder):
    save(folder / "train_label.npy", np.load(folder / "train_label.npy")[:-1])
    msg = load_error(data_cfg(folder))
    assert msg.startswith(f"{folder / 'train_label.npy'}:") and "99 labels for 100 rows" in msg


def test_unreadable_array(folder):
    (folder / "ztest.npy").write_text("not numpy")
    assert load_error(data_cfg(folder)).startswith(f"{folder / 'ztest.npy'}: not a readable .npy array")


def test_non_integer_labels(folder):
    save(folder / "z_label.npy", np.load(folder / "z_label.npy") + 0.5)
    assert load_error(data_cfg(folder)).startswith(f"{folder / 'z_label.npy'}: labels must be integers")


def test_nan_features(folder):
    x = np.load(folder / "train.npy")
    x[3, 1] = np.nan
    save(folder / "train.npy", x)
    assert load_error(data_cfg(folder)).startswith(f"{folder / 'train.npy'}: sample 3 holds NaN or inf")


def test_feature_width_mismatch(folder):
    save(folder / "ztest.npy", np.load(folder / "ztest.npy")[:, :8])
    assert load_error(data_cfg(folder)).startswith(f"{folder / 'ztest.npy'}: feature width 8")


def test_labels_outside_class_list_name_file_and_class_source(folder):
    msg = load_error(data_cfg(folder), 10, class_list="the 10 classes of names.txt")
    assert msg.startswith(f"{folder / 'train_label.npy'}: labels outside the 10 classes of names.txt (0..9)")


def test_z_label_not_in_unseen(folder):
    msg = load_error(data_cfg(folder, unseen=[2, 8]))
    assert msg.startswith(f"{folder / 'z_label.npy'}: labels [7] are not unseen classes")
    assert "remapped" not in msg


def test_remapped_z_label_gets_hint(folder):
    save(folder / "z_label.npy", np.searchsorted(UNSEEN, np.load(folder / "z_label.npy")))   # 2, 7 -> 0, 1
    msg = load_error(data_cfg(folder, unseen=UNSEEN))
    assert msg.startswith(f"{folder / 'z_label.npy'}:") and "remapped" in msg
    # Without data.unseen the unseen classes default to z_label's, and the clash shows up in train_label.npy.
    msg = load_error(data_cfg(folder))
    assert msg.startswith(f"{folder / 'train_label.npy'}:") and "remapped" in msg


def test_train_labels_containing_unseen_classes(folder):
    msg = load_error(data_cfg(folder, unseen=[2, 7, 9]))
    assert msg.startswith(f"{folder / 'train_label.npy'}: labels [9] are not seen classes")
    assert "remapped" not in msg


def test_seen_unseen_overlap(folder):
    msg = load_error(data_cfg(folder, unseen=UNSEEN, seen=[0, 1, 2, 3]))
    assert "data.seen" in msg and "data.unseen" in msg and "[2]" in msg


def test_val_classes_must_be_seen(folder):
    msg = load_error(data_cfg(folder, val_unseen=[2, 3]))
    assert msg.startswith("data.val_unseen") and "[2]" in msg


def drop_class(folder: Path, cls: int) -> None:
    keep = np.load(folder / "train_label.npy") != cls
    save(folder / "train.npy", np.load(folder / "train.npy")[keep])
    save(folder / "train_label.npy", np.load(folder / "train_label.npy")[keep])


def test_val_without_train_samples(folder, tmp_path):
    # Class 11 is seen by an explicit split but has no sample in train.npy.
    drop_class(folder, 11)
    seen = [c for c in range(NUM_CLASSES) if c not in UNSEEN]
    msg = load_error(data_cfg(folder, seen=seen, val_unseen=[10, 11]))
    assert msg.startswith("data.val_unseen: validation classes [11]")
    # By default a class without samples is not seen at all.
    assert "are not seen classes" in load_error(data_cfg(folder, val_unseen=[11]))


def test_explicit_seen_class_without_samples(folder):
    drop_class(folder, 11)
    msg = load_error(data_cfg(folder, seen=[c for c in range(NUM_CLASSES) if c not in UNSEEN]))
    assert msg.startswith("data.seen (") and "seen classes [11] have no samples" in msg


def test_seen_defaults_to_classes_with_samples_not_the_names_file(folder):
    # NTU-60-style features (12 classes) with an NTU-120-style list twice as long: the 12 extra classes have no
    # samples, so they are neither trained on, nor validation classes, nor drawn as negatives.
    task = load_feature_task(data_cfg(folder, val_unseen=3), 2 * NUM_CLASSES)
    with_samples = sorted(set(task.train.labels.tolist()))
    assert task.num_classes == 2 * NUM_CLASSES
    assert task.seen == with_samples == [c for c in range(NUM_CLASSES) if c not in UNSEEN]
    assert set(task.val) <= set(with_samples)
    fit, _, fit_classes = task.tuning_split()                 # fit_classes is fit_tdsm's negative pool
    assert fit_classes == sorted(set(with_samples) - set(task.val)) == sorted(set(fit.labels.tolist()))
    _, _, final_classes = task.final_split()
    assert final_classes == with_samples


# ----------------------------------------------------------------------------------------------
# Split files and validation classes
# ----------------------------------------------------------------------------------------------

def ids_error(spec, num_classes: int = NUM_CLASSES, key: str = "data.unseen") -> str:
    with pytest.raises(InputError) as err:
        load_class_ids(spec, num_classes, key)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_class_id_file_errors(tmp_path):
    assert ids_error(tmp_path / "ru.npy").startswith(f"{tmp_path / 'ru.npy'}: missing")
    assert ids_error(save(tmp_path / "big.npy", [3, 12])).startswith(f"{tmp_path / 'big.npy'}: class ids [12] outside")
    assert ids_error(save(tmp_path / "rep.npy", [3, 3])).startswith(f"{tmp_path / 'rep.npy'}: repeated")
    assert ids_error(save(tmp_path / "2d.npy", [[3, 4]])).startswith(f"{tmp_path / '2d.npy'}: expected a 1-D")
    assert ids_error(save(tmp_path / "f.npy", [3.0, 4.0])).startswith(f"{tmp_path / 'f.npy'}: class ids must be")
    assert ids_error([1, -1]).startswith("data.unseen: class ids [-1] outside")


def test_val_count_is_carved_from_seen_with_seed():
    seen = list(range(50))
    a = carve_validation(seen, 5, seed=0)
    assert a == carve_validation(seen, 5, seed=0) and len(a) == 5 and set(a) <= set(seen)
    assert any(carve_validation(seen, 5, seed=s) != a for s in range(1, 4))


@pytest.mark.parametrize("count", [1, 9, 10, 11])     # 10 seen classes: 1 validation or 1 training class is too few
def test_val_count_out_of_range(count):
    with pytest.raises(InputError, match="data.val_unseen"):
        resolve_split(DataConfig(val_unseen=count), NUM_CLASSES, UNSEEN)


def test_val_count_zero_is_refused_by_the_config():
    with pytest.raises(ValueError, match="val_unseen"):
        DataConfig(val_unseen=0)


def test_val_count_uses_val_seed(folder):
    a = load_feature_task(data_cfg(folder, val_unseen=3, val_seed=1), NUM_CLASSES).val
    assert a == load_feature_task(data_cfg(folder, val_unseen=3, val_seed=1), NUM_CLASSES).val
    others = [load_feature_task(data_cfg(folder, val_unseen=3, val_seed=s), NUM_CLASSES).val for s in (2, 3, 4)]
    assert any(o != a for o in others)


def test_val_file_leaving_no_training_class(tmp_path):
    cfg = DataConfig(unseen=[0], val_unseen=save(tmp_path / "rv.npy", [1, 2]))
    with pytest.raises(InputError, match="leaves no seen class"):
        resolve_split(cfg, 3, [0])


def test_real_synse_split_files(shared_data):
    splits = shared_data / "zsl" / "synse-zsl" / "label_splits"
    ru, rv, rs = (splits / f for f in ("ru5.npy", "rv5_0.npy", "rs55.npy"))
    if not all(p.is_file() for p in (ru, rv, rs)):
        pytest.skip("SynSE label splits are absent")
    unseen, val, seen_ids = (np.load(p).tolist() for p in (ru, rv, rs))
    assert set(val) <= set(seen_ids) and not set(unseen) & set(seen_ids)
    assert sorted(unseen + seen_ids) == list(range(60))
    seen, got_unseen, got_val = resolve_split(DataConfig(unseen=ru, seen=rs, val_unseen=rv), 60, [])
    assert got_unseen == sorted(unseen) == EMBEDDED_UNSEEN and seen == sorted(seen_ids) and got_val == sorted(val)


# ----------------------------------------------------------------------------------------------
# The generated task
# ----------------------------------------------------------------------------------------------

def test_synthetic_task_is_seeded_and_split():
    text = torch.randn(60, 32, generator=torch.Generator().manual_seed(0))
    cfg = DataConfig(synthetic={"samples_per_class": 6, "feature_dim": 16, "text_components": 4})
    task = generate_synthetic_task(cfg, text)
    assert task.unseen == EMBEDDED_UNSEEN and len(task.seen) == 55 and set(task.val) <= set(task.seen)
    assert task.train.features.shape == (55 * 6, 16) and len(task.test) == 5 * 6
    again = generate_synthetic_task(cfg, text)
    assert torch.equal(task.train.features, again.train.features)
    other = generate_synthetic_task(DataConfig(synthetic={**cfg.synthetic.model_dump(), "seed": 1}), text)
    assert not torch.equal(task.train.features, other.train.features)
