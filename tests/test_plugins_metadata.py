"""Metadata of the nine NTK-CL benchmark plugins: class counts, protocols, files and their checksums."""

from __future__ import annotations

import re

import pytest

from ntkcl.data.prepared import PreparedDataset
from ntkcl.data.registry import get_dataset

# name: (classes, init, increment, acquisition)
NINE = {
    "cifar100": (100, 10, 10, "download"),
    "imagenet-r": (200, 20, 20, "download"),
    "imagenet-a": (200, 20, 20, "manual"),
    "domainnet": (345, 23, 23, "download"),
    "oxford-pets": (37, 7, 5, "download"),
    "eurosat": (10, 2, 2, "download"),
    "plantvillage": (15, 3, 3, "manual"),
    "vtab": (50, 10, 10, "manual"),
    "kvasir": (8, 2, 2, "manual"),
}
UNPUBLISHED_CHECKSUM = {"plantvillage", "kvasir"}


@pytest.mark.parametrize("name", sorted(NINE))
def test_plugin_metadata(name):
    classes, init, increment, acquisition = NINE[name]
    plugin = get_dataset(name)
    assert isinstance(plugin, PreparedDataset) and plugin.name == name
    assert (plugin.num_classes, plugin.default_init_classes, plugin.default_increment) == (classes, init, increment)
    assert plugin.homepage.startswith("http") and plugin.license and plugin.citation.startswith("@")
    assert plugin.label_order
    if plugin.class_names:
        assert len(plugin.class_names) == classes == len(set(plugin.class_names))
    assert plugin.needs_manual_file == (acquisition == "manual")
    for remote in plugin.accepted:
        if remote.md5:
            assert re.fullmatch(r"[0-9a-f]{32}", remote.md5)
        if remote.sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
        if remote.manual:
            assert plugin.obtain_hint or remote in plugin.alternates
        else:
            assert remote.url.startswith("http") and remote.size
        if name in UNPUBLISHED_CHECKSUM:
            assert remote.checksum_kind == "none"
        else:
            assert remote.checksum_kind != "none", remote.name


def test_published_checksums_are_pinned():
    assert get_dataset("cifar100").files[0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    imagenet_r = get_dataset("imagenet-r")
    assert imagenet_r.files[0].md5 == "a61312130a589d0ca1a8fca1f2bd3337"
    assert imagenet_r.alternates[0].md5 == "730aa3fb9c7d2ec0b6381c6b23040681"
    assert get_dataset("imagenet-a").files[0].md5 == "7f4aaf0b1532b7a0bd670822c152d3c5"
    assert get_dataset("vtab").files[0].md5 == "a9c37bde6105a2516c900b0c33a437c1"
    assert get_dataset("eurosat").files[0].md5 == "c8fa014336c82ac7804f0398fcb19387"
    assert [r.md5 for r in get_dataset("oxford-pets").files] == [
        "5c4f3ee8e5d25df40f4fd59a7f44e54c",
        "95a8c909bbe2e81eed6a22bccdf3f68f",
    ]
    domainnet = get_dataset("domainnet")
    assert len(domainnet.files) == 18 and all(r.sha256 for r in domainnet.files)


def test_label_orders_follow_the_reference():
    pets = get_dataset("oxford-pets").class_names
    assert list(pets) == sorted(pets, key=str.lower) and pets[:2] == ("Abyssinian", "american_bulldog")
    for name in ("eurosat", "plantvillage", "kvasir", "cifar100"):
        names = get_dataset(name).class_names
        assert list(names) == sorted(names)


@pytest.mark.parametrize("name", ["imagenet-a", "vtab", "plantvillage", "kvasir"])
def test_manual_message_names_the_file_and_the_next_command(name):
    message = get_dataset(name).manual_message()
    assert f"ntkcl prepare {name} --from" in message and "http" in message
