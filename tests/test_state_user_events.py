"""RedisState's copy of the users' event lists (apply.lua returns only what a step appended): whatever writes the
state in between — another instance on the same prefix, a retried step whose reply was lost, lost Redis state,
several Lua steps per apply — every apply's `user_events` equals the list in Redis (LRANGE), the SQLite backend's
semantics."""

from __future__ import annotations

import random
import uuid

from rentalml.config import Settings
from rentalml.state.base import user_event
from rentalml.state.redis import RedisState


def test_user_events_equal_the_stored_lists_across_instances_retries_and_lost_state(redis_url):
    prefix = f"uev:{uuid.uuid4().hex[:8]}"
    s = Settings(stream={"key_prefix": prefix, "allowed_lateness_s": 3600, "taste_events": 7})
    a, b = RedisState(s, redis_url), RedisState(s, redis_url)
    a.chunk = b.chunk = 13  # several pipelined Lua steps per apply
    rnd = random.Random(7)
    t, ids, checked, kinds = 1.7e9, [], 0, {"b": 0, "retry": 0, "lost": 0}
    try:
        for n in range(60):
            evs = []
            for _ in range(rnd.randrange(1, 50)):
                t += rnd.uniform(-100, 300)
                eid = rnd.choice(ids) if ids and rnd.random() < 0.1 else f"e{len(ids)}"  # some redeliveries
                ids.append(eid)
                evs.append({"id": eid, "k": "i", "t": rnd.choice("vsia"), "u": f"u{rnd.randrange(5)}",
                            "p": f"p{rnd.randrange(9)}", "ts": t})
            st = a if rnd.random() < 0.75 else b
            kinds["b"] += st is b
            batch = f"b{n}"
            res = st.apply(evs, batch=batch)
            if rnd.random() < 0.2:  # the reply was lost: the same batch again gets the first run's outcomes
                kinds["retry"] += 1
                again = st.apply(evs, batch=batch)
                assert again.outcomes == res.outcomes
                res = again
            assert set(res.user_events) == set(res.users)
            for u, events in res.user_events.items():
                assert events == [user_event(x) for x in a.redis.lrange(f"{prefix}:uev:{u}", 0, -1)], (n, u)
                assert len(events) <= 7
                checked += 1
            if rnd.random() < 0.1:  # Redis lost the users' state (a restart without persistence)
                kinds["lost"] += 1
                a.redis.delete(*[f"{prefix}:{k}:u{i}" for k in ("uev", "user") for i in range(5)])
        assert checked > 200 and all(kinds.values()), (checked, kinds)
    finally:
        for key in a.redis.scan_iter(f"{prefix}:*"):
            a.redis.delete(key)
        a.close()
        b.close()
