"""Seeded synthetic rental marketplace: properties, users with latent tastes, and a view→lease funnel.

Users choose properties by a utility (location match, budget fit, bedrooms fit, amenity affinity, pets,
a modest popularity term, noise) sampled with a softmax over a per-user candidate set drawn from their
areas, their home city and a few random listings, so no users × properties matrix is ever built. Work is
vectorised over chunks of users; the same seed gives identical tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml.data.dataset import Dataset
from rentalml.schema import EVENT_WEIGHTS, PROPERTY_COLUMNS, USER_COLUMNS

#: name -> (lat, lon, price level: multiplier on a national base rent)
DEFAULT_CITIES: dict[str, tuple[float, float, float]] = {
    "Boston": (42.3601, -71.0589, 1.45),
    "Chicago": (41.8781, -87.6298, 1.0),
    "Austin": (30.2672, -97.7431, 0.95),
    "Denver": (39.7392, -104.9903, 1.05),
    "Seattle": (47.6062, -122.3321, 1.35),
}
AMENITIES = [
    "parking", "gym", "laundry", "balcony", "dishwasher", "pool", "elevator", "doorman", "garden",
    "air_conditioning", "furnished", "ev_charging", "storage", "bike_room", "roof_terrace",
]
_AMENITY_P = np.array([0.45, 0.25, 0.55, 0.4, 0.5, 0.12, 0.35, 0.1, 0.2, 0.6, 0.2, 0.08, 0.3, 0.2, 0.1])
_AMENITY_VALUE = np.array([60, 40, 50, 40, 30, 60, 30, 90, 40, 40, 80, 50, 20, 10, 70], dtype=float)
PROPERTY_TYPES = ["apartment", "house", "studio", "townhouse", "condo"]
ROOM_TYPES = ["entire_home", "private_room", "shared_room"]
EVENT_TYPES = ["view", "save", "inquiry", "application", "lease"]
#: share of engagements (view chains) that reach save / inquiry / application / lease
_FUNNEL = np.array([0.2, 0.09, 0.04, 0.018])
_N_NEIGHBOURHOODS = 8
_DAY = 86_400


def _city_table(cities: Sequence[str] | Mapping | None, rng: np.random.Generator) -> pd.DataFrame:
    if cities is None:
        cities = DEFAULT_CITIES
    rows = []
    if isinstance(cities, Mapping):
        for name, spec in cities.items():
            lat, lon, *level = spec
            rows.append((str(name), float(lat), float(lon), float(level[0]) if level else 1.0))
    else:
        for name in cities:
            if name in DEFAULT_CITIES:
                rows.append((name, *DEFAULT_CITIES[name]))
            else:
                rows.append((str(name), rng.uniform(30, 48), rng.uniform(-122, -72), rng.uniform(0.8, 1.4)))
    if not rows:
        raise ValueError("cities must not be empty")
    return pd.DataFrame(rows, columns=["city", "lat", "lon", "level"])


def _ids(prefix: str, n: int, start: int = 1) -> np.ndarray:
    width = max(6, len(str(start + n)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(start, start + n)], dtype=object)


def _amenity_lists(mask: np.ndarray) -> list[list[str]]:
    names = np.array(AMENITIES, dtype=object)
    bits = (mask[:, None] >> np.arange(len(AMENITIES))) & 1
    return [names[row.astype(bool)].tolist() for row in bits]


def _group_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for the given group sizes."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


class _World:
    """Neighbourhoods and properties (observable columns plus the latents used for choice)."""

    def __init__(self, n_properties: int, cities: pd.DataFrame, rng: np.random.Generator, t0: int):
        n_c = len(cities)
        nb = _N_NEIGHBOURHOODS
        self.n_nb = n_c * nb
        self.nb_city = np.repeat(np.arange(n_c), nb)
        self.nb_names = np.array([f"{c}-n{j + 1}" for c in cities["city"] for j in range(nb)], dtype=object)
        self.city_names = cities["city"].to_numpy(dtype=object)
        nb_lat = np.repeat(cities["lat"].to_numpy(), nb) + rng.normal(0, 0.05, self.n_nb)
        nb_lon = np.repeat(cities["lon"].to_numpy(), nb) + rng.normal(0, 0.06, self.n_nb)
        self.nb_level = np.repeat(cities["level"].to_numpy(), nb) * rng.lognormal(0, 0.22, self.n_nb)
        city_w = rng.dirichlet(np.full(n_c, 4.0))
        nb_w = rng.dirichlet(np.full(nb, 2.0), size=n_c).ravel() * np.repeat(city_w, nb)

        # properties sorted by neighbourhood (and so by city): contiguous ranges make candidate draws cheap
        counts = rng.multinomial(n_properties, nb_w / nb_w.sum())
        self.nb_start = np.cumsum(counts) - counts
        self.nb_count = counts
        self.city_start = self.nb_start[::nb]
        self.city_count = counts.reshape(n_c, nb).sum(1)
        p_nb = np.repeat(np.arange(self.n_nb), counts)
        self.nb = p_nb
        self.city = self.nb_city[p_nb]
        n = n_properties

        room = rng.choice(3, n, p=[0.82, 0.14, 0.04])
        beds = rng.choice(6, n, p=[0.1, 0.32, 0.3, 0.17, 0.07, 0.04])
        ptype = np.where(beds >= 3, rng.choice([0, 1, 3, 4], n, p=[0.3, 0.4, 0.2, 0.1]),
                         rng.choice([0, 4, 3], n, p=[0.75, 0.2, 0.05]))
        ptype = np.where(beds == 0, np.where(rng.random(n) < 0.8, 2, 0), ptype)
        area = np.round((28 + 24 * beds + 12 * (ptype == 1)) * rng.lognormal(0, 0.15, n), 1)
        baths = np.clip(np.round((0.8 + 0.5 * beds + rng.normal(0, 0.35, n)) * 2) / 2, 1.0, 4.0)
        amen = (rng.random((n, len(AMENITIES))) < _AMENITY_P).astype(np.int64)
        mask = (amen << np.arange(len(AMENITIES))).sum(1).astype(np.int32)
        base = 650 + 380 * beds + 7.5 * area + amen @ _AMENITY_VALUE
        room_f = np.array([1.0, 0.45, 0.3])[room]
        price = self.nb_level[p_nb] * base * room_f * rng.lognormal(0, 0.12, n)
        self.price = np.maximum(np.round(price / 5) * 5, 200.0)
        self.beds, self.room, self.mask = beds, room, mask
        self.pets = rng.random(n) < 0.45
        self.quality = rng.normal(0, 1, n)  # latent: drives the global popularity term
        listed = t0 - rng.integers(_DAY, 180 * _DAY, n)
        avail = listed + rng.integers(0, 60 * _DAY, n)
        self.items = pd.DataFrame({
            "property_id": _ids("p_", n),
            "price": self.price,
            "bedrooms": beds.astype(np.int64),
            "bathrooms": baths,
            "area_sqm": area,
            "lat": np.round(nb_lat[p_nb] + rng.normal(0, 0.012, n), 6),
            "lon": np.round(nb_lon[p_nb] + rng.normal(0, 0.015, n), 6),
            "property_type": np.array(PROPERTY_TYPES, dtype=object)[ptype],
            "room_type": np.array(ROOM_TYPES, dtype=object)[room],
            "city": self.city_names[self.city],
            "neighbourhood": self.nb_names[p_nb],
            "amenities": _amenity_lists(mask),
            "pets_allowed": self.pets,
            "available_from": [date.fromordinal(719163 + int(d)) for d in avail // _DAY],
            "listed_at": pd.to_datetime(listed, unit="s", utc=True),
        })[PROPERTY_COLUMNS]


class _Users:
    """Users' latent tastes and their observable (noisy) columns."""

    def __init__(self, n_users: int, w: _World, rng: np.random.Generator):
        n = n_users
        city_w = w.city_count / w.city_count.sum()
        home = rng.choice(len(city_w), n, p=city_w)
        # 1-3 latent neighbourhoods in the home city (weighted by listings), ~10% add one in another city
        n_nb = rng.choice([1, 2, 3], n, p=[0.45, 0.35, 0.2])
        nbs = np.full((n, 3), -1, dtype=np.int64)
        cum = np.cumsum(w.nb_count)
        for j in range(3):
            r = rng.random(n)
            lo = w.nb_start[home * _N_NEIGHBOURHOODS]
            pos = lo + np.floor(r * w.city_count[home]).astype(np.int64)
            nbs[:, j] = np.where(j < n_nb, np.searchsorted(cum, pos, side="right"), -1)
        other = rng.random(n) < 0.1
        o_city = rng.choice(len(city_w), n, p=city_w)
        o_pos = w.nb_start[o_city * _N_NEIGHBOURHOODS] + np.floor(rng.random(n) * w.city_count[o_city])
        o_nb = np.searchsorted(cum, o_pos.astype(np.int64), side="right")
        slot = np.minimum(n_nb, 2)
        nbs[np.arange(n), slot] = np.where(other, o_nb, nbs[np.arange(n), slot])
        n_nb = np.where(other, slot + 1, n_nb)
        self.nbs, self.n_nb, self.home = nbs, n_nb, home

        household = rng.choice([1, 2, 3, 4, 5], n, p=[0.38, 0.32, 0.15, 0.1, 0.05])
        beds = np.clip(household - 1 + rng.choice([-1, 0, 0, 0, 1], n), 0, 5)
        level = w.nb_level[nbs[:, 0]]
        self.budget = level * (650 + 380 * beds + 7.5 * (28 + 24 * beds) + 250) * rng.lognormal(0, 0.22, n)
        self.beds = beds
        self.household = household
        self.taste = rng.normal(0, 0.45, (n, len(AMENITIES))).astype(np.float32)
        self.has_pets = rng.random(n) < 0.25
        self.price_sens = rng.lognormal(0, 0.35, n)
        self.temperature = rng.uniform(0.7, 1.3, n)  # some users choose more randomly than others
        self.eagerness = rng.normal(0, 0.5, n)  # propensity to go down the funnel

        # observable columns: noisy indicators of the latents
        obs_budget = np.round(self.budget * rng.lognormal(0, 0.1, n) / 50) * 50
        obs_beds = np.clip(beds + np.where(rng.random(n) < 0.15, rng.choice([-1, 1], n), 0), 0, 5)
        swap = rng.random((n, 3)) < 0.12
        pos = w.nb_start[w.nb_city[np.maximum(nbs, 0)] * _N_NEIGHBOURHOODS] + np.floor(
            rng.random((n, 3)) * w.city_count[w.nb_city[np.maximum(nbs, 0)]])
        noisy = np.where(swap, np.searchsorted(cum, pos.astype(np.int64), side="right"), nbs)
        names = w.nb_names
        areas = [list(dict.fromkeys(names[row[:k]])) for row, k in zip(noisy, n_nb, strict=True)]
        self.table = pd.DataFrame({
            "user_id": _ids("u_", n),
            "budget": obs_budget.astype(float),
            "preferred_bedrooms": obs_beds.astype(np.int64),
            "preferred_areas": areas,
            "household_size": household.astype(np.int64),
        })[USER_COLUMNS]


def _activity(n_users: int, n_events: int, rng: np.random.Generator) -> np.ndarray:
    if n_events < 3 * n_users:
        raise ValueError(f"n_events ({n_events}) must be at least 3 * n_users ({3 * n_users})")
    w = rng.lognormal(0, 1.1, n_users)
    return 3 + rng.multinomial(n_events - 3 * n_users, w / w.sum())


def _utility(u: _Users, w: _World, users: np.ndarray, cand: np.ndarray, rng: np.random.Generator
             ) -> np.ndarray:
    """Utility of each (chunk user, candidate) pair, shape (len(users), K)."""
    nbs = u.nbs[users]
    c_nb = w.nb[cand]
    in_nb = (c_nb[:, :, None] == nbs[:, None, :]).any(2)
    in_city = w.city[cand] == u.home[users][:, None]
    loc = 3.0 * in_nb + 1.2 * in_city
    over = np.log(w.price[cand] / u.budget[users][:, None])
    budget = -u.price_sens[users][:, None] * (5.0 * np.maximum(over, 0) + 1.0 * np.maximum(-over - 0.35, 0))
    beds = -0.7 * np.abs(w.beds[cand] - u.beds[users][:, None])
    shared = (w.room[cand] > 0) & (u.household[users][:, None] > 1)
    mask = w.mask[cand]
    taste = u.taste[users]
    amen = np.zeros(cand.shape, dtype=np.float32)
    for a in range(len(AMENITIES)):
        amen += ((mask >> a) & 1) * taste[:, a:a + 1]
    pets = -3.0 * (u.has_pets[users][:, None] & ~w.pets[cand])
    noise = rng.normal(0, 0.5, cand.shape)
    util = loc + budget + beds - 1.5 * shared + amen + pets + 0.45 * w.quality[cand] + noise
    return util / u.temperature[users][:, None]


def _candidates(u: _Users, w: _World, users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K candidate properties per user: ~60% own neighbourhoods, ~25% home city, ~15% anywhere."""
    m = len(users)
    k_nb, k_city = int(round(0.6 * k)), int(round(0.25 * k))
    k_any = k - k_nb - k_city
    pick = np.floor(rng.random((m, k_nb)) * u.n_nb[users][:, None]).astype(np.int64)
    nb = u.nbs[users][np.arange(m)[:, None], pick]
    a = w.nb_start[nb] + np.floor(rng.random((m, k_nb)) * w.nb_count[nb]).astype(np.int64)
    home = u.home[users][:, None]
    b = w.city_start[home] + np.floor(rng.random((m, k_city)) * w.city_count[home]).astype(np.int64)
    c = rng.integers(0, len(w.price), (m, k_any))
    return np.concatenate([a, b, c], axis=1)


def generate_marketplace(n_users: int = 2000, n_properties: int = 1000, n_events: int = 50_000,
                         seed: int = 42, cities: Sequence[str] | Mapping | None = None,
                         n_candidates: int = 64, start: str = "2024-01-01", days: int = 90,
                         chunk_users: int = 16_384) -> Dataset:
    """Synthetic marketplace as a `Dataset` named "synthetic" (interactions, items, users).

    `cities`: names (known ones keep their centres) or a mapping name -> (lat, lon[, price level]).
    """
    if n_users < 1 or n_properties < 1:
        raise ValueError("n_users and n_properties must be positive")
    rng = np.random.default_rng(seed)
    t0 = int(pd.Timestamp(start, tz="UTC").timestamp())
    span = days * _DAY
    city_tab = _city_table(cities, rng)
    world = _World(n_properties, city_tab, rng, t0)
    users = _Users(n_users, world, rng)
    counts = _activity(n_users, n_events, rng)
    k = max(4, n_candidates)

    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("user", "item", "stage", "ts", "sess")}
    sess_next = 0
    bounds = list(range(0, n_users, chunk_users)) + [n_users]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        uidx = np.arange(lo, hi)
        m = len(uidx)
        cnt = counts[lo:hi]
        cand = _candidates(users, world, uidx, k, rng)
        util = _utility(users, world, uidx, cand, rng)
        prob = np.exp(util - util.max(1, keepdims=True))
        cdf = np.cumsum(prob, 1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        flat = (cdf + np.arange(m)[:, None]).ravel()
        # sample up to cnt engagements per user (each one is a view chain of 1-5 events)
        row = np.repeat(np.arange(m), cnt)
        pos = np.searchsorted(flat, row + rng.random(len(row)), side="right")
        pos = np.minimum(pos, row * k + k - 1)
        item = cand.ravel()[pos]
        # funnel depth: ordinal model on utility + eagerness + noise, thresholds hit the target rates
        g = util.ravel()[pos] + users.eagerness[uidx][row] + rng.logistic(0, 0.8, len(row))
        depth = (g[:, None] > np.quantile(g, 1 - _FUNNEL)[None, :]).sum(1)
        # at most one lease per user
        lease = depth == 4
        first = np.cumsum(cnt) - cnt
        lcum = np.cumsum(lease)
        lcum_before = np.concatenate([[0], lcum])[first][row]
        depth = np.where(lease & (lcum - lcum_before > 1), 3, depth)
        # keep chains until the user's event budget is used, truncating the last chain
        length = depth + 1
        csum = np.cumsum(length)
        start_in_user = csum - length - np.concatenate([[0], csum])[first][row]
        keep = start_in_user < cnt[row]
        length = np.minimum(length, cnt[row] - start_in_user)[keep]
        row, item, eng_rank = row[keep], item[keep], _group_arange(cnt)[keep]
        n_eng = np.bincount(row, minlength=m)
        # time: each user is active over a window, engagements grouped into sessions in order
        u_start = rng.random(m) * span * 0.9
        u_len = np.minimum(span - u_start, rng.exponential(20 * _DAY, m) + _DAY)
        n_sess = np.maximum(1, np.round(n_eng / rng.uniform(2, 8, m))).astype(np.int64)
        sess = (eng_rank * n_sess[row]) // np.maximum(n_eng[row], 1)
        t_view = u_start[row] + u_len[row] * sess / n_sess[row] + rng.random(len(row)) * 2400
        sess_id = sess_next + (np.cumsum(n_sess) - n_sess)[row] + sess
        sess_next += int(n_sess.sum())
        # expand chains into events
        e = np.repeat(np.arange(len(row)), length)
        stage = _group_arange(length)
        gaps = np.stack([np.zeros(len(row)), rng.uniform(10, 1200, len(row)),
                         rng.exponential(8 * 3600, len(row)), rng.exponential(2 * _DAY, len(row)),
                         rng.exponential(4 * _DAY, len(row))], 1).cumsum(1)
        ts = t_view[e] + gaps[e, stage]
        deep = stage >= 2  # inquiries and later steps happen in sessions of their own
        sid = sess_id[e]
        sid[deep] = sess_next + np.arange(int(deep.sum()))
        sess_next += int(deep.sum())
        parts["user"].append(uidx[row][e])
        parts["item"].append(item[e])
        parts["stage"].append(stage.astype(np.int8))
        parts["ts"].append(np.minimum(t0 + ts, t0 + span - 1).astype(np.int64))
        parts["sess"].append(sid)

    ts = np.concatenate(parts.pop("ts"))
    order = np.argsort(ts, kind="stable")
    cat = {key: np.concatenate(v)[order] for key, v in parts.items()}
    n = len(order)
    # session ids numbered in order of first appearance
    uniq, first_idx, inv = np.unique(cat.pop("sess"), return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first_idx, kind="stable")] = np.arange(len(uniq))
    sess = rank[inv.ravel()]
    del uniq, first_idx, inv, rank
    stage = cat.pop("stage")
    columns = {
        "event_id": _ids("e_", n, start=0),
        "user_id": users.table["user_id"].to_numpy()[cat.pop("user")],
        "property_id": world.items["property_id"].to_numpy()[cat.pop("item")],
        "event_type": np.array(EVENT_TYPES, dtype=object)[stage],
        "timestamp": pd.to_datetime(ts[order], unit="s", utc=True),
        "weight": np.array([EVENT_WEIGHTS[t] for t in EVENT_TYPES])[stage],
        "session_id": _ids("s_", int(sess.max()) + 1, start=0)[sess],
    }
    interactions = pd.DataFrame(columns, copy=False)  # keys in schema.INTERACTION_COLUMNS order
    items, user_table = world.items, users.table
    del columns, cat, ts, order, stage, sess, world, users  # lower the peak while Dataset copies
    meta = {"generator": "rentalml.data.generator", "seed": seed, "n_users": n_users,
            "n_properties": n_properties, "n_events": n_events, "start": start, "days": days}
    return Dataset(interactions, items, user_table, name="synthetic", meta=meta)


def write_marketplace(dataset: Dataset, out_dir: str | Path) -> Path:
    """Write interactions.parquet, properties.parquet and users.parquet under `out_dir`."""
    return dataset.save(out_dir)
