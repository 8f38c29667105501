"""Two-level tree VQ: one child per parent is flat VQ, the leaf search by hand, gradients, round trip."""

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index
from vqlab.schema import ConfigError

from .helpers import tokens

HAND_SET = {"init": "uniform", "dead_code_steps": 0}  # no k-means init or re-seeding to replace codes set by hand


def test_one_child_per_parent_is_flat_vq_on_the_parent_codebook():
    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=16, children=1, dim=4, **HAND_SET)
    flat = vqlab.quantizers.build("vq", codebook_size=16, dim=4, **HAND_SET)
    with torch.no_grad():
        flat.embedding.copy_(tree.parent.embedding)
        tree.offsets.zero_()
    z = tokens(tree, batch=4, n=32)
    for mode in ("train", "eval"):
        out, reference = getattr(tree, mode)()(z), getattr(flat, mode)()(z)
        assert torch.equal(out.codes, reference.codes)  # the child digit, always 0, is left out
        assert torch.equal(out.z_q, reference.z_q)
        for name in ("codebook", "commitment"):
            assert torch.equal(out.losses[f"parent/{name}"], reference.losses[name])
        assert out.stats["perplexity"] == reference.stats["perplexity"]
    assert torch.equal(tree.encode(z), flat.encode(z)) and tree.radices == flat.radices
    assert torch.equal(tree.decode(out.codes), out.z_q)


def test_a_token_takes_its_nearest_parent_then_that_parents_nearest_child():
    tree = vqlab.quantizers.build("tree_vq", parents=2, children=2, dim=2, beta=0.5, **HAND_SET)
    with torch.no_grad():
        tree.parent.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        # parent 0's children sit left and right of it, parent 1's above and below
        tree.offsets.copy_(torch.tensor([[[-1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]]))
    z = torch.tensor([[[0.9, 0.0], [-2.0, 0.5], [9.0, 2.0], [11.0, -0.5], [4.9, 0.9]]], requires_grad=True)
    out = tree(z)
    assert out.codes[0].tolist() == [[1, 0], [0, 0], [0, 1], [1, 1], [1, 0]]  # [child, parent]
    assert out.z_q[0].tolist() == [[1, 0], [-1, 0], [10, 1], [10, -1], [1, 0]]
    assert digits_to_index(out.codes, tree.radices)[0].tolist() == [1, 0, 2, 3, 1]  # child + 2 * parent
    residual = torch.tensor([[0.9, 0.0], [-2.0, 0.5], [-1.0, 2.0], [1.0, -0.5], [4.9, 0.9]])
    offset = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    squared = (residual - offset).square().sum() / residual.numel()
    assert out.losses["child/codebook"].item() == pytest.approx(squared.item())
    assert out.losses["child/commitment"].item() == pytest.approx(0.5 * squared.item())


def test_the_leaf_search_is_tree_searched_not_the_nearest_leaf():
    """A token nearer another parent's leaf than any leaf of its own parent keeps its own parent."""
    tree = vqlab.quantizers.build("tree_vq", parents=2, children=2, dim=1, **HAND_SET)
    with torch.no_grad():
        tree.parent.embedding.copy_(torch.tensor([[0.0], [4.0]]))
        tree.offsets.copy_(torch.tensor([[[-1.0], [-0.5]], [[-1.5], [1.0]]]))  # leaves -1, -0.5, 2.5, 5
    out = tree(torch.tensor([[[1.9]]]))  # nearest parent 0 (1.9 < 2), nearest leaf overall 2.5 (parent 1)
    assert out.codes[0, 0].tolist() == [1, 0] and out.z_q.item() == -0.5


def test_the_gradient_reaching_z_is_the_identity_and_each_codebook_learns_from_its_loss():
    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=8, children=4, dim=3, **HAND_SET).hooks_driven_by_caller()
    z = tokens(tree, batch=2, n=16).requires_grad_()
    weights = torch.randn(z.shape)
    (tree(z).z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)
    assert tree.offsets.grad is None and tree.parent.embedding.grad is None  # z_q's value is straight-through
    z.grad = None
    out = tree(z)
    out.losses["child/codebook"].backward(retain_graph=True)
    assert z.grad is None and tree.parent.embedding.grad is None  # moves the offsets only
    used = tree.offsets.grad.abs().sum(-1) > 0  # (n, m): exactly the leaves the tokens took
    expected = torch.zeros(8, 4, dtype=torch.bool)
    expected[out.codes[..., 1].flatten(), out.codes[..., 0].flatten()] = True
    assert torch.equal(used, expected)
    out.losses["child/commitment"].backward(retain_graph=True)
    assert (
        z.grad is None or not z.grad.any()
    )  # the residual after a straight-through parent is constant to z, as in rvq
    out.losses["parent/commitment"].backward()
    assert z.grad.abs().sum() > 0


def test_small_random_offsets_spread_the_tokens_over_every_child():
    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=2, children=8, dim=4, **HAND_SET)
    with torch.no_grad():
        tree.parent.embedding.copy_(torch.tensor([[0.0] * 4, [100.0] * 4]))  # every token under parent 0
    codes = tree.eval().encode(tokens(tree, batch=8, n=64))
    assert (codes[..., 1] == 0).all() and codes[..., 0].unique().numel() == 8


def test_codes_round_trip_in_eval_on_any_leading_shape():
    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=8, children=4, dim=3, **HAND_SET)
    z = tokens(tree, seed=1, batch=3, n=10)
    tree.train()(z)  # one step of the training path first: the eval codes come from the same search
    tree.on_optimizer_step()
    out = tree.eval()(z)
    assert torch.equal(tree.encode(z), out.codes)
    assert torch.equal(tree.decode(out.codes), out.z_q)
    assert torch.equal(tree.decode(out.codes[1, :4]), out.z_q[1, :4])  # (N, 2)
    assert tree.codebook_size == 32 and tree.radices == (4, 8)


def test_the_leaf_search_in_blocks_equals_the_search_at_once(monkeypatch):
    import vqlab.quantizers.tree_vq as module

    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=8, children=4, dim=3, **HAND_SET).eval()
    z = tokens(tree, batch=2, n=50)
    whole = tree.encode(z)
    monkeypatch.setattr(module, "block_elements", lambda device: 4 * 3 * 7)  # 7 tokens per block
    assert torch.equal(tree.encode(z), whole)


def test_the_parent_level_learns_as_vq_does_through_the_hook():
    """k-means init on the first training forward, dead-code state applied by on_optimizer_step."""
    torch.manual_seed(0)
    tree = vqlab.quantizers.build("tree_vq", parents=8, children=2, dim=3).hooks_driven_by_caller()
    before = tree.parent.embedding.detach().clone()
    z = tokens(tree, batch=4, n=16)
    tree(z)
    assert not torch.equal(tree.parent.embedding, before)  # k-means replaced the initial codebook
    assert tree.has_pending_updates()
    tree.on_optimizer_step()
    assert not tree.has_pending_updates() and int(tree.parent.usage.steps) == 1


def test_bad_options_are_config_errors():
    for options, key in [
        ({"children": 0}, "children"),
        ({"parents": 1}, "parents"),
        ({"child_scale": 0.0}, "child_scale"),
        ({"beta": -1.0}, "beta"),
    ]:
        with pytest.raises(ConfigError) as err:
            vqlab.quantizers.build("tree_vq", **options)
        assert err.value.key.split(".")[-1] == key, (options, err.value.key)


def test_rvq_and_product_take_vq_stages_and_groups():
    """The decomposition table's residual (n + m codes) and product (n and m codes on halves) rows."""
    torch.manual_seed(0)
    rvq = vqlab.quantizers.build("rvq", depth=2, base={"name": "vq", "codebook_size": 32, "dim": 8})
    product = vqlab.quantizers.build("product", groups=2, base={"name": "vq", "codebook_size": 32, "dim": 4})
    for q in (rvq, product):
        z = tokens(q, batch=4, n=16)
        out = q(z)
        assert q.radices == (32, 32) and q.dim == 8 and out.z_q.shape == z.shape
