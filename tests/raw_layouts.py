"""Tiny raw downloads in each dataset's real on-disk layout, written by the tests (no real data
is committed). One function per dataset, each returning the folder to pass as --root, and
write_all(root) writing every one under root/<name> with the folder names run_all.sh expects.
Images are small noise with a per-class brightness, so a model can tell classes apart."""
import gzip
import os
import pickle

import numpy as np
import pandas as pd
from PIL import Image

CHEXPERT_COLUMNS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices"]
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
PADCHEST_STRINGS = ["normal", "pleural effusion", "laminar atelectasis", "cardiomegaly", "alveolar pattern",
                    "air bronchogram", "pacemaker", "adenopathy", "unchanged", "costophrenic angle blunting"]


def image(rng, size, level=0.5, channels=1, dtype=np.uint8):
    top = np.iinfo(dtype).max
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.clip(rng.normal(level * top, 0.15 * top, shape), 0, top).astype(dtype)


def save(path, pixels, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


def chexpert(root, n=24, seed=0, size=32, folder="CheXpert-v1.0-small"):
    """root/FOLDER/{train,valid}.csv (1.0 / 0.0 / -1.0 / blank cells) and
    root/FOLDER/{train,valid}/patientNNNNN/studyN/view1_frontal.jpg (+ view2_lateral.jpg)."""
    rng = np.random.default_rng(seed)
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding," + ",".join(CHEXPERT_COLUMNS)
    lines = {"train": [], "valid": []}
    for i in range(n):
        patient = i // 2 + 1
        split = "valid" if patient % 4 == 0 else "train"
        lateral = i % 5 == 4
        rel = f"{folder}/{split}/patient{patient:05d}/study{i % 2 + 1}/" + ("view2_lateral.jpg" if lateral else "view1_frontal.jpg")
        cells = [["1.0", "0.0", "-1.0", ""][int(rng.integers(4))] for _ in CHEXPERT_COLUMNS]
        save(os.path.join(root, rel), image(rng, size, 0.3 + 0.4 * (cells[1] == "1.0")), quality=95)
        view = ("", "Lateral") if lateral else ("PA" if i % 3 else "AP", "Frontal")
        lines[split].append(",".join([rel, "Female", "50", view[1], view[0], "1.0" if i % 7 == 0 else ""] + cells))
    for split, rows in lines.items():
        with open(os.path.join(root, folder, f"{split}.csv"), "w") as f:
            f.write(header + "\n" + "".join(r + "\n" for r in rows))
    return root


def mimic(root, n=24, seed=0, size=32):
    """MIMIC-CXR-JPG 2.0.0: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and the chexpert, metadata and
    split tables (.csv.gz); two images (PA or AP, and LATERAL) per study."""
    rng = np.random.default_rng(seed)
    labels, meta, split = [], [], []
    for k in range((n + 1) // 2):
        subject, study = 10000000 + k, 50000000 + k
        cells = {c: [1.0, 0.0, -1.0, np.nan][int(rng.integers(4))] for c in CHEXPERT_COLUMNS}
        labels.append({"subject_id": subject, "study_id": study, **cells, "No Finding": 1.0 if k % 5 == 0 else np.nan})
        for j, view in enumerate(["PA" if k % 2 else "AP", "LATERAL"][:n - 2 * k]):
            dicom = f"{k:04d}{j}abc"
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                         "Rows": size, "Columns": size, "StudyDate": 21000101})
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                          "split": ["train", "train", "validate", "test"][k % 4]})
            save(os.path.join(root, f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"),
                 image(rng, size, 0.3 + 0.4 * (cells["Cardiomegaly"] == 1)), quality=95)
    for name, rows in (("chexpert", labels), ("metadata", meta), ("split", split)):
        with gzip.open(os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv.gz"), "wt") as f:
            pd.DataFrame(rows).to_csv(f, index=False)
    return root


def nih(root, n=24, seed=0, size=32):
    """NIH ChestX-ray14: images/*.png, Data_Entry_2017_v2020.csv with its real 11-field rows,
    train_val_list.txt and test_list.txt (split by patient)."""
    rng = np.random.default_rng(seed)
    rows, test, train_val = [], [], []
    for i in range(n):
        patient, follow_up = i // 3 + 1, i % 3
        name = f"{patient:08d}_{follow_up:03d}.png"
        findings = [f for f in NIH_FINDINGS if rng.random() < 0.15]
        save(os.path.join(root, "images", name), image(rng, size, 0.3 + 0.4 * ("Cardiomegaly" in findings)))
        rows.append(f"{name},{'|'.join(findings) or 'No Finding'},{follow_up},{patient},50,M,"
                    f"{'PA' if i % 2 else 'AP'},2500,2048,0.168,0.168")
        (test if patient % 4 == 0 else train_val).append(name)
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n" + "\n".join(rows) + "\n")
    for name, names in (("test_list.txt", test), ("train_val_list.txt", train_val)):
        with open(os.path.join(root, name), "w") as f:
            f.write("".join(x + "\n" for x in names))
    return root


def padchest(root, n=24, seed=0, size=32):
    """PadChest: the labels CSV (.csv.gz, unnamed index column, Python-literal Labels, some
    empty) and 16-bit PNGs (12 bits stored) in the folder named by ImageDir."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"2168401113669640{i:04d}_00-{i:03d}-000.png"
        strings = [str(s) for s in rng.choice(PADCHEST_STRINGS, int(rng.integers(1, 3)), replace=False)]
        labels = np.nan if i % 11 == 5 else str([" " + strings[0]] + strings[1:])
        rows.append({"ImageID": name, "ImageDir": i % 2, "StudyDate_DICOM": 20100101, "PatientID": f"p{i // 2}",
                     "Projection": ["PA", "L", "AP_horizontal", "PA", "AP", "COSTAL", "PA", "EXCLUDE"][i % 8],
                     "BitsStored_DICOM": 12, "Labels": labels})
        save(os.path.join(root, str(i % 2), name),
             image(rng, size, 0.3 + 0.4 * ("cardiomegaly" in strings), dtype=np.uint16) >> 4)
    with gzip.open(os.path.join(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"), "wt") as f:
        pd.DataFrame(rows).to_csv(f)
    return root


def covidx(root, n=24, seed=0, size=32):
    """COVIDx CXR-2: train.txt / test.txt (`patient file label source`) and train/, test/."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n - n // 4), ("test", n // 4)):
        lines = []
        for i in range(count):
            label = ["negative", "positive"][i % 2]
            name = f"{split}{i:04d}.png"
            save(os.path.join(root, split, name), image(rng, size, 0.3 + 0.4 * (label == "positive")))
            lines.append(f"{split}{i // 2} {name} {label} ricord")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def tuberculosis(root, n=24, seed=0, size=32):
    """Shenzhen and Montgomery: ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png and
    MontgomerySet/CXR_png/MCUCXR_0001_1.png (last digit = label), two thirds Shenzhen."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        prefix, folder = ("CHNCXR", "ChinaSet_AllFiles") if i < n * 2 // 3 else ("MCUCXR", "MontgomerySet")
        save(os.path.join(root, folder, "CXR_png", f"{prefix}_{i + 1:04d}_{label}.png"), image(rng, size, 0.3 + 0.4 * label))
    return root


def _cifar(root, folder, files, meta, key, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name in files:
        y = np.repeat(np.arange(len(classes)), per_class)
        data = np.stack([image(rng, 32, 0.2 + 0.6 * c / len(classes), 3).transpose(2, 0, 1).ravel() for c in y])
        with open(os.path.join(root, folder, name), "wb") as f:
            pickle.dump({"data": data, key: y.tolist()}, f)
    with open(os.path.join(root, folder, meta[0]), "wb") as f:
        pickle.dump({meta[1]: classes}, f)
    return root


def cifar10(root, per_class=1, seed=0):
    """torchvision's cifar-10-batches-py: data_batch_1..5, test_batch (pickled uint8 rows), batches.meta."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return _cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                  ("batches.meta", "label_names"), "labels", names, per_class, seed)


def cifar100(root, per_class=1, seed=0):
    """torchvision's cifar-100-python: train, test (fine_labels), meta (fine_label_names)."""
    return _cifar(root, "cifar-100-python", ["train", "test"], ("meta", "fine_label_names"), "fine_labels",
                  [f"class{i:02d}" for i in range(100)], per_class, seed)


def flowers102(root, train_per_class=1, valid_per_class=1, test_per_class=2, classes=102, seed=0, size=24):
    """torchvision's flowers-102: jpg/image_00001.jpg, imagelabels.mat (1-based class per image),
    setid.mat (trnid, valid, tstid). Only the first `classes` classes get images."""
    import scipy.io
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "flowers-102")
    labels, ids, i = [], {"trnid": [], "valid": [], "tstid": []}, 0
    for c in range(classes):
        for key, count in (("trnid", train_per_class), ("valid", valid_per_class), ("tstid", test_per_class)):
            for _ in range(count):
                i += 1
                save(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), image(rng, size, 0.1 + 0.8 * c / classes, 3))
                labels.append(c + 1)
                ids[key].append(i)
    scipy.io.savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array(labels)[None]})
    scipy.io.savemat(os.path.join(base, "setid.mat"), {k: np.array(v)[None] for k, v in ids.items()})
    return root


def pets(root, per_class=2, classes=("Abyssinian", "american_bulldog", "beagle"), seed=0, size=24):
    """torchvision's oxford-iiit-pet: images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt
    (`name class_id species breed_id`); half of each class in test."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "oxford-iiit-pet")
    lines = {"trainval": [], "test": []}
    for c, breed in enumerate(classes):
        for k in range(2 * per_class):
            name = f"{breed}_{k + 1}"
            save(os.path.join(base, "images", name + ".jpg"), image(rng, size, 0.2 + 0.6 * c / len(classes), 3))
            lines["test" if k % 2 else "trainval"].append(f"{name} {c + 1} {1 + breed[0].islower()} {c + 1}")
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    for split, rows in lines.items():
        with open(os.path.join(base, "annotations", f"{split}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return root


def imagenet(root, classes=3, per_class=2, seed=0, size=24):
    """ILSVRC2012 extracted: train/<wnid>/<wnid>_<n>.JPEG and val/<wnid>/ILSVRC2012_val_<n>.JPEG."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        wnid = f"n{1440764 + c:08d}"
        for k in range(per_class):
            save(os.path.join(root, "train", wnid, f"{wnid}_{k}.JPEG"), image(rng, size, 0.2 + 0.6 * c / classes, 3))
            save(os.path.join(root, "val", wnid, f"ILSVRC2012_val_{c * per_class + k + 1:08d}.JPEG"),
                 image(rng, size, 0.2 + 0.6 * c / classes, 3))
    return root


FOLDERS = {"chexpert": chexpert, "mimic-cxr-jpg": mimic, "nih": nih, "padchest": padchest, "covidx": covidx,
           "tuberculosis": tuberculosis, "cifar10": cifar10, "cifar100": cifar100, "flowers102": flowers102,
           "pets": pets, "imagenet": imagenet}


def write_all(root):
    """Every dataset's tiny layout under root/<folder> (the names run_all.sh expects)."""
    for folder, write in FOLDERS.items():
        write(os.path.join(root, folder))
    return root
