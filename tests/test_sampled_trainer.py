"""The sampled-softmax trainer (rentalml.models.neural, softmax="sampled"): quality against the full softmax,
determinism per seed, catalogue-independent steps, fold-in of new users and never-seen properties."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from rentalml.data.dataset import InteractionMatrix
from rentalml.evaluation.protocols import aggregate_pairs, holdout_split
from rentalml.models.base import TrainData
from rentalml.models.neural import BatchSampler, NeuralParams, RowAdam, TwoTower, TwoTowerNet
from rentalml.training.trainer import _features, catalogue, fit_model

#: the same optimisation budget for both losses; 64 shared negatives on a 200-item catalogue, 24 users per
#: step, so the sampled softmax really sees a subset of the catalogue at each step
SMALL = {"epochs": 30, "eval_every": 5, "batch_size": 24, "sampled_batch_size": 24, "negatives": 64,
         "lr": 2e-3, "sampled_lr": 2e-3, "dim": 64, "hidden": 128}


@pytest.fixture(scope="module")
def data(market):
    pairs = aggregate_pairs(market.interactions)
    items = catalogue(market, pairs)
    users = np.array(sorted(pairs["user_id"].unique()), dtype=object)
    _, item_x, _, user_x = _features(market, items, users)
    tr, va = holdout_split(pairs, 0.1, 43)
    m_tr = InteractionMatrix.build(tr, item_ids=items, user_ids=users).matrix
    m_va = InteractionMatrix.build(va, item_ids=items, user_ids=users).matrix
    return TrainData(m_tr, item_x, user_x, valid=m_va, seed=42)


@pytest.mark.parametrize("kw", [{"use_content": False}, {}], ids=["collaborative", "hybrid"])
def test_sampled_reaches_full_softmax_validation_ndcg(data, kw):
    full = TwoTower(**SMALL, **kw, softmax="full").fit(data)
    sampled = TwoTower(**SMALL, **kw, softmax="sampled").fit(data)
    assert full.softmax_ == "full" and sampled.softmax_ == "sampled"
    # the candidates of a step are a strict subset of the catalogue (not a disguised full softmax)
    b = BatchSampler(data.binary(), sampled.params, id_dropout=False).batch(np.arange(24),
                                                                           np.random.default_rng(0))
    assert len(b.items) < data.n_items
    assert sampled.best_val >= 0.98 * full.best_val, (sampled.best_val, full.best_val)


def test_auto_selects_the_loss_by_validation(data):
    auto = TwoTower(**{**SMALL, "epochs": 15}, softmax="auto").fit(data)
    scores = auto.softmax_scores_
    assert set(scores) == {"full", "sampled"}
    assert auto.softmax_ == max(scores, key=scores.get)
    assert auto.best_val == max(scores.values())
    assert auto.selected_params()["softmax"] == auto.softmax_
    # without a holdout there is nothing to select on: full softmax within the limit, sampled above it
    assert TwoTower(**{**SMALL, "epochs": 1}).fit(TrainData(data.matrix, data.item_features,
                                                            data.user_features)).softmax_ == "full"
    big = TwoTower(**{**SMALL, "epochs": 1, "full_softmax_limit": 50}).fit(
        TrainData(data.matrix, data.item_features, data.user_features))
    assert big.softmax_ == "sampled"


def test_same_seed_same_weights_and_scores(data):
    kw = {**SMALL, "epochs": 5, "softmax": "sampled"}
    a, b = TwoTower(**kw).fit(data), TwoTower(**kw).fit(data)
    for (k, va), (_, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    users = np.arange(50)
    x = data.binary()
    np.testing.assert_array_equal(a.score(users, x[users]), b.score(users, x[users]))
    other = TwoTower(**kw).fit(TrainData(data.matrix, data.item_features, data.user_features, data.valid, seed=7))
    assert not np.array_equal(a.score(users, x[users]), other.score(users, x[users]))


def test_step_touches_only_its_items(data):
    """Row-wise optimizer: an embedding row that is in no step's candidate set does not move (no dense Adam
    drift), and a step's cost follows its items, not the catalogue."""
    x = data.binary()
    x = sp.csr_matrix(x[:, :150])  # items 150..199 never interacted with
    x = sp.hstack([x, sp.csr_matrix((x.shape[0], 50))]).tocsr()
    model = TwoTower(epochs=1, softmax="sampled", negatives=1, sampled_batch_size=16, use_content=False,
                     dim=16, sample_alpha=1.0)
    torch.manual_seed(0)
    model.fit(TrainData(x, seed=3))
    # replay the sampler with the same draws to find every row that was a candidate
    p = model.params
    rng = np.random.default_rng(3)
    sampler = BatchSampler(x, p, id_dropout=False)
    perm = rng.permutation(np.flatnonzero(np.diff(x.indptr) > 0))
    touched = set()
    for s in range(0, len(perm), p.sampled_batch_size):
        touched |= set(sampler.batch(perm[s:s + p.sampled_batch_size], rng).items.tolist())
    untouched = sorted(set(range(x.shape[1])) - touched)
    assert untouched, "every row was sampled; the check needs some untouched ones"
    torch.manual_seed(3)
    fresh = type(model.net)(x.shape[1], 0, 0, p)  # the same seeded initialisation as fit's
    np.testing.assert_array_equal(model.net.item_id.weight.detach()[untouched],
                                  fresh.item_id.weight.detach()[untouched])
    assert (model.net.item_bias.detach()[untouched] == 0).all()


def test_fold_in_works_with_the_sampled_trainer(market, splits):
    """A brand-new user is folded in from a history (no retrain): the same scores as a training user with
    that history; a never-seen property is placed by the content tower through foldin's graph module."""
    from rentalml.export.foldin import FoldIn
    from rentalml.export.onnx_export import dummy_history

    train, _ = splits("random-75-25")
    fitted = fit_model("hybrid", market, train, params={**SMALL, "epochs": 10, "softmax": "sampled",
                                                        "neighbours": 32}, seed=42)
    tower = fitted.model.tower
    assert fitted.params["softmax"] == "sampled" and tower.softmax_ == "sampled"
    hist = fitted.train[[3]]
    known = tower.score(np.array([3]), hist)
    new = tower.score(None, hist, fitted.user_features[[3]])
    np.testing.assert_allclose(new, known, rtol=1e-6)
    # fold-in of a never-seen property: the graph module's score = user vector · content vector + median bias
    mod = FoldIn(fitted).eval()
    h = dummy_history(len(fitted.item_ids), 8)
    feats = torch.from_numpy(fitted.item_features[:4])
    uf = torch.from_numpy(fitted.user_features[:h.shape[0]].astype(np.float32))
    with torch.no_grad():
        scores, proxy = mod(h, feats, uf)
    assert scores.shape == (h.shape[0], 4) and torch.isfinite(scores).all()
    assert ((proxy >= 0) & (proxy < len(fitted.item_ids))).all()


def test_params_defaults_are_consistent():
    p = NeuralParams()
    assert p.softmax == "auto" and p.sampled_batch_size > 0 and p.negatives > 0
    with pytest.raises(ValueError, match="softmax"):
        TwoTower(softmax="nope").fit(TrainData(sp.csr_matrix(np.eye(4, dtype=np.float32))))


def test_sampled_loss_is_each_users_softmax_over_own_positives_and_shared_negatives(data):
    """The step's loss equals, per user, the multinomial log-likelihood of its positives under a softmax over
    its own positives and the shared negatives (each counted once), every logit minus log q; other users'
    positives are not candidates, so the logits per interaction do not grow with the batch."""
    p = NeuralParams(dim=16, hidden=32, negatives=64, input_dropout=0.5)
    x = data.binary()
    torch.manual_seed(0)
    net = TwoTowerNet(x.shape[1], 0, 0, replace(p, use_content=False))
    sampler = BatchSampler(x, p, id_dropout=False)
    b = sampler.batch(np.arange(24), np.random.default_rng(5))
    assert len(b.hit_rows) > 0, "the check needs an accidental hit (a negative that is a user's positive)"
    assert len(b.neg) <= p.negatives
    tables = {"input_id": net.input_id.weight, "item_id": net.item_id.weight, "item_bias": net.item_bias}
    rows = RowAdam(tables, lr=1e-3).gather(b.items)
    loss = net.sampled_loss(b, None, None, rows)
    with torch.no_grad():
        t_in, t_out = rows["input_id"][:b.n_pos], rows["item_id"]
        h = torch.zeros(24, 16).index_add_(0, b.in_rows, t_in[b.in_cols]) * b.in_norm[:, None]
        u = net.user_tower(torch.tanh(h))
        ref = 0.0
        for r in range(24):
            own = b.pos_cols[b.pos_rows == r]
            cand = torch.unique(torch.cat([own, b.neg]))
            logits = u[r] @ t_out[cand].T + rows["item_bias"][cand] - b.log_q[cand]
            lsm = torch.log_softmax(logits, 0)
            ref -= lsm[torch.searchsorted(cand, own)].sum()
        ref /= 24
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)


def test_weight_ema_is_what_validation_scores_and_fit_keeps(data):
    """`ema` (the collaborative tower's default, COLLABORATIVE_DEFAULTS): the fitted network is the running average
    of the weights, and validation and early stopping score that average. Seen through the result: a decay so close
    to 1 that the average stays at the first step's weights keeps a barely trained model, while a fit without the
    EMA trains on; an ordinary decay trains as well as no EMA; and the average is deterministic per seed."""
    kw = {**SMALL, "epochs": 10, "use_content": False, "softmax": "sampled"}
    plain = TwoTower(**kw).fit(data)
    frozen = TwoTower(**kw, ema=0.999999).fit(data)
    smooth, again = TwoTower(**kw, ema=0.9).fit(data), TwoTower(**kw, ema=0.9).fit(data)
    assert frozen.best_val < 0.5 * plain.best_val, (frozen.best_val, plain.best_val)
    assert smooth.best_val >= 0.9 * plain.best_val, (smooth.best_val, plain.best_val)
    users = np.arange(50)
    x = data.binary()
    np.testing.assert_array_equal(smooth.score(users, x[users]), again.score(users, x[users]))
    assert not np.array_equal(smooth.score(users, x[users]), plain.score(users, x[users]))
    restored = pickle.loads(pickle.dumps(smooth))  # as a bundle stores it
    np.testing.assert_array_equal(restored.score(users, x[users]), smooth.score(users, x[users]))
    with pytest.raises(ValueError, match="ema"):
        TwoTower(**kw, ema=1.0).fit(data)
