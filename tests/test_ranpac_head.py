"""RanPAC's random-projection ridge head against direct least-squares solves on small data."""

import torch
import torch.nn.functional as F

from ntkcl.models.heads import RandomProjectionRidge, RidgeSums, ridge_validation_errors, validation_split


def make_head(in_features=6, projection_dim=40, seed=0) -> RandomProjectionRidge:
    torch.manual_seed(seed)
    return RandomProjectionRidge(in_features, projection_dim)


def ridge_lstsq(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ‖XW − Y‖² + λ‖W‖², as an ordinary least-squares problem on [X; √λ I], [Y; 0]."""
    width = features.shape[1]
    augmented = torch.cat([features, ridge**0.5 * torch.eye(width, dtype=features.dtype)])
    return torch.linalg.lstsq(augmented, F.pad(targets, (0, 0, 0, width))).solution


def test_validation_split_is_a_fixed_share_and_independent_of_sharding():
    count, seed = 50, 7
    whole = validation_split(torch.arange(count), count, 0.8, seed)
    assert int(whole.sum()) == count - int(0.8 * count)
    # Two processes holding positions [0::2] and [1::2] mark the same images.
    shards = [validation_split(torch.arange(rank, count, 2), count, 0.8, seed) for rank in range(2)]
    assert torch.equal(whole[0::2], shards[0]) and torch.equal(whole[1::2], shards[1])
    assert not torch.equal(whole, validation_split(torch.arange(count), count, 0.8, seed + 1))


def test_ridge_choice_and_readout_equal_direct_least_squares():
    head = make_head()
    generator = torch.Generator().manual_seed(1)
    tasks = [
        (torch.randn(30, 6, generator=generator), torch.randint(0, 3, (30,), generator=generator)),
        (torch.randn(25, 6, generator=generator), torch.randint(3, 5, (25,), generator=generator)),
    ]
    seen_features, seen_labels = [], []
    for index, (features, labels) in enumerate(tasks):
        head.grow_to(int(labels.max()) + 1)
        positions = torch.arange(len(labels))
        ridge = head.learn(features, labels, positions, split_seed=index)

        projected = head.project(features).double()
        targets = F.one_hot(labels, head.num_classes).double()
        validation = validation_split(positions, len(labels), 0.8, index)
        errors = torch.stack(
            [
                (
                    (
                        projected[validation] @ ridge_lstsq(projected[~validation], targets[~validation], candidate)
                        - targets[validation]
                    )
                    ** 2
                ).sum()
                for candidate in head.ridges.tolist()
            ]
        )
        sums = RidgeSums(40, head.num_classes, torch.device("cpu"))
        sums.add(projected, labels, validation)
        # λ ≤ 1e-3 on a rank-deficient fit (24 images, M = 40) is ill-conditioned for any solver: compare the rest.
        torch.testing.assert_close(ridge_validation_errors(sums, head.ridges)[6:], errors[6:], rtol=1e-6, atol=1e-8)
        assert ridge == head.ridges[int(torch.argmin(errors))].item() and ridge >= 1e-2

        seen_features.append(projected)
        seen_labels.append(labels)
        everything = torch.cat(seen_features)
        expected = ridge_lstsq(everything, F.one_hot(torch.cat(seen_labels), head.num_classes).double(), ridge)
        torch.testing.assert_close(head.gram, everything.T @ everything)
        torch.testing.assert_close(head.weight.double(), expected.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(head(features), head.project(features) @ head.weight.T)


def test_sums_of_two_shards_equal_the_sums_of_the_whole_task():
    head = make_head()
    head.grow_to(4)
    features, labels = torch.randn(21, 6), torch.randint(0, 4, (21,))
    validation = validation_split(torch.arange(21), 21, 0.8, 3)
    whole = head.new_sums()
    projected = head.project(features)
    whole.add(projected, labels, validation)
    shards = [head.new_sums() for _ in range(2)]
    for rank, sums in enumerate(shards):
        sums.add(projected[rank::2], labels[rank::2], validation[rank::2])
    # A two-process all-reduce is the elementwise sum of the two shards' tensors.
    partner = iter(
        [shards[1].fit_gram, shards[1].fit_cross, shards[1].val_gram, shards[1].val_cross, shards[1].val_targets]
    )
    reduced = shards[0].reduce(lambda tensor: tensor.add_(next(partner)))
    for name in ("fit_gram", "fit_cross", "val_gram", "val_cross", "val_targets"):
        torch.testing.assert_close(getattr(reduced, name), getattr(whole, name))


def test_projection_and_readout_stay_float32_under_autocast():
    head = make_head()
    head.grow_to(2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert head(torch.randn(3, 6)).dtype == torch.float32
        assert head.project(torch.randn(3, 6).bfloat16()).dtype == torch.float32
