"""A full `ntkcl train` on digits with a tiny ViT, through the CLI."""

from tests.conftest import TINY_BACKBONE_FLAGS


def test_train_digits_simplecil_json(cli, data_root, tmp_path):
    result = cli(
        "train",
        "--stream",
        "digits",
        "--method",
        "simplecil",
        *TINY_BACKBONE_FLAGS,
        "--out",
        tmp_path / "runs",
        "--json",
        "-q",
    )
    assert result.code == 0, result.err
    document = result.json()
    assert document["ok"] is True
    assert document["metrics"]["num_tasks"] == 5
