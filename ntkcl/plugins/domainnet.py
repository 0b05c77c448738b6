"""DomainNet (Peng et al., 2019): 345 classes over six domains, the official per-domain train/test lists.

`prepare` downloads the six domain zips (the cleaned clipart and painting versions) and the twelve split
files, all sha256-pinned, extracts the zips side by side (`<domain>/<class>/<file>`) and takes train and test
as the union over domains of `<domain>_train.txt` and `<domain>_test.txt`. Labels come from those files:
0..344 in case-insensitive alphabetical order of the class names (`aircraft_carrier` = 0, `zigzag` = 344),
not ImageFolder order. The class-incremental protocol of NTK-CL mixes all domains (init 23, increment 23).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError

BASE_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

ZIPS = (
    RemoteFile("clipart.zip", BASE_URL + "groundtruth/clipart.zip", 1_270_909_081,
               sha256="f8f248a3e8bbc9868c523ae24e6601b4c2ad102afc60c0efeb4f3255df22354d"),
    RemoteFile("infograph.zip", BASE_URL + "infograph.zip", 4_338_659_804,
               sha256="891e14f476317e97b6f06d6498c11d0a5b8d0c8b57210765ed9beb072da611fa"),
    RemoteFile("painting.zip", BASE_URL + "groundtruth/painting.zip", 3_679_366_174,
               sha256="fa47e6d405503ea0286cabd767f176bd30e988b63ddd7b9db16cf030c9770015"),
    RemoteFile("quickdraw.zip", BASE_URL + "quickdraw.zip", 459_920_701,
               sha256="9f37df2a8c3733703dbb35ad9964202a65f675ca30137756457537536b485d84"),
    RemoteFile("real.zip", BASE_URL + "real.zip", 6_062_039_589,
               sha256="d7fe010b430c5b510f85d657d38c4a1924822695fabea4fef57bd00dba251d63"),
    RemoteFile("sketch.zip", BASE_URL + "sketch.zip", 2_633_992_926,
               sha256="23a7dbae7016b343e934399beaa8a68728fb5e570ebe2c71df9b75cf91c499fc"),
)  # fmt: skip

_SPLIT_FILES = {
    "clipart": ((1_443_819, "affdadf5f95a7583e6b98030a3d35007e2613ee4dd942393c5a705ec2b429312"),
                (628_917, "62c8e36aaba1c41ad9e249099739707220a44c08f167b37ef420f34a31628a6b")),
    "infograph": ((1_683_098, "36b44cbd41a2915e0dc73b4f4be8862a6f3c220f93c8d63fb2439beeae3aefda"),
                  (728_028, "413cfa54ac92e7e6b242f4f09fbd9c8ace85c4deaf3cb6c81ff6b68264460136")),
    "painting": ((2_241_901, "f1da38d50a702fddf1329f85bc607d7a2abcae7e6aec75e1fd49cc1bd340d47b"),
                 (971_888, "11472b13b5188e09f06918b12eebb660588c97a20e43e268d9b02e3e37eb8f97")),
    "quickdraw": ((5_164_600, "3a5edd3bc215772010eebc87f158707703dd7e48091d13b816af81326a9d1c0f"),
                  (2_213_400, "2a00a60650a453c65c356da748fec54084a197272137c440e7d52d08947357bf")),
    "real": ((4_440_944, "19d483256d24aef19e581b65eda8333fd918aef3eb733fe499ff384120e3a289"),
             (1_911_327, "2b3f75bcde309aeb5931292084b2162e936b5f189e3bb1ad716f0f74c460864c")),
    "sketch": ((1_960_222, "72f4bc6afa5702a1ccba800d0053c1427de87439dfaf246dbc9a2e71abfec54f"),
               (850_581, "3fb48fca18c507c4321f007c3f62b308ec232ff6928cbfe2af64e76ec366e840")),
}  # fmt: skip

SPLIT_LISTS = tuple(
    RemoteFile(f"{domain}_{split}.txt", f"{BASE_URL}domainnet/txt/{domain}_{split}.txt", size, sha256=digest)
    for domain, pair in _SPLIT_FILES.items()
    for split, (size, digest) in zip(("train", "test"), pair)
)


def parse_split_list(path: Path) -> list[tuple[str, int]]:
    """Rows `<domain>/<class>/<file> <label>` of an official split file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            relative, label = line.rsplit(maxsplit=1)
            rows.append((relative.strip(), int(label)))
        except ValueError as error:
            raise BadInputError(f"{path.name}:{number}: not `<path> <label>`: {line!r}") from error
    return rows


class DomainNet(PreparedDataset):
    name = "domainnet"
    num_classes = 345
    label_order = "official split-file labels: case-insensitive alphabetical class names"
    homepage = "http://ai.bu.edu/M3SDA/"
    license = "for research use (per the DomainNet site)"
    citation = (
        "@inproceedings{peng2019moment, title={Moment Matching for Multi-Source Domain Adaptation}, "
        "author={Peng, Xingchao and Bai, Qinxun and Xia, Xide and Huang, Zijun and Saenko, Kate and Wang, Bo}, "
        "booktitle={ICCV}, pages={1406--1415}, year={2019}}"
    )
    files = ZIPS + SPLIT_LISTS
    default_init_classes = 23
    default_increment = 23

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        for remote in ZIPS:
            extract_archive(inputs.archives[remote.name], stage)
        lists_dir = stage / "splits"
        lists_dir.mkdir()
        names: dict[int, str] = {}
        splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for remote in SPLIT_LISTS:
            copy = lists_dir / remote.name
            shutil.copyfile(inputs.archives[remote.name], copy)
            split = "train" if remote.name.endswith("_train.txt") else "test"
            for relative, label in parse_split_list(copy):
                class_name = relative.split("/")[1] if relative.count("/") >= 2 else ""
                if names.setdefault(label, class_name) != class_name:
                    raise BadInputError(f"{remote.name}: label {label} names both {names[label]} and {class_name}")
                splits[split].append((relative, label))
        if sorted(names) != list(range(self.num_classes)):
            raise BadInputError(f"domainnet split files name {len(names)} labels, expected 0..{self.num_classes - 1}")
        missing = [relative for rows in splits.values() for relative, _ in rows if not (stage / relative).is_file()]
        if missing:
            raise BadInputError(f"the domain zips lack {len(missing)} listed image(s), e.g. {missing[0]}")
        classes = [names[label] for label in range(self.num_classes)]
        return Layout(classes, splits, {"label_order": self.label_order, "split": {"recipe": "official"}})


plugin = DomainNet()
