"""Session 22's cuts of the CPU inside a request's plan window keep the answers they replace:
``UploadScheduler.server_state`` kept across requests (its held names grown from the last ones, its weights on their
way listed once per acknowledgement) equals the per-weight definition, in the graph's weight order, along random
streams of in-place changes (acknowledgements, queued weights, bytes sent), and a request whose key did not move
walks no weight of the graph; ``Trajectory.sent`` summed over what the held set added equals its per-weight
definition on random held sets that grow, shrink and jump."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from modelgraph import capture
from partitioner.state import ServerState
from ue_client.trajectory import Trajectory
from ue_client.uploads import UploadScheduler


def _graph(n: int = 12):
    """A captured MLP of ``n`` layers whose biases are zero (several weight names per sha256)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        lin = torch.nn.Linear(4, 4)
        with torch.no_grad():
            lin.bias.zero_()
        layers += [lin, torch.nn.ReLU()]
    return capture(torch.nn.Sequential(*layers).eval(), (torch.randn(2, 4),), name="mlp")


def _by_definition(ups: UploadScheduler) -> ServerState:
    """``server_state`` as it was written before session 16: one ``_held`` per sha256, in ``sha_names`` order."""
    held, in_flight = set(), {}
    for sha, names in ups.sha_names.items():
        if ups._held(sha):
            held.update(names)
        elif sha in ups.queued:
            for n in names:
                in_flight[n] = ups.queued[sha].remaining
    return ServerState(held=frozenset(held), in_flight=in_flight)


class _Walked(dict):
    """``sha_names`` that counts the passes over all of it."""

    walks = 0

    def __iter__(self):
        _Walked.walks += 1
        return super().__iter__()

    def items(self):
        _Walked.walks += 1
        return super().items()

    def values(self):
        _Walked.walks += 1
        return super().values()


def test_server_state_kept_across_in_place_changes_is_the_per_weight_definition():
    g = _graph()
    shas = sorted({g.weight_sha256(w) for w in g.weights})
    assert len(shas) < len(g.weights)  # (zero biases share bytes)
    rng = random.Random(22)
    checked = {"in flight": 0, "settled": 0}
    for _ in range(40):
        sess = SimpleNamespace(held=set())
        ups = UploadScheduler(g, SimpleNamespace(session=sess))
        ups.query_held = set(rng.sample(shas, rng.randint(0, 3)))
        for _ in range(30):
            r = rng.random()
            if r < 0.3:  # an acknowledgement
                sess.held.add(rng.choice([*shas, "f" * 64]))
            elif r < 0.45:
                ups.query_held.add(rng.choice(shas))  # (in place)
            elif r < 0.65:  # a weight queued (once per session)
                sha = rng.choice(shas)
                ups.queued.setdefault(sha, SimpleNamespace(remaining=rng.randint(1, 99)))
            elif r < 0.85 and ups.queued:  # bytes sent
                it = ups.queued[rng.choice(list(ups.queued))]
                it.remaining = max(0, it.remaining - rng.randint(0, 40))
            elif r < 0.9:  # a new session
                sess = SimpleNamespace(held=set())
                ups.conn.session = sess
                ups.reset(set(rng.sample(shas, rng.randint(0, 2))))
            want, got = _by_definition(ups), ups.server_state()
            assert got.held == want.held
            assert list(got.in_flight.items()) == list(want.in_flight.items())  # (the same order)
            checked["in flight" if want.in_flight else "settled"] += 1
    assert min(checked.values()) > 100


def test_a_request_whose_key_did_not_move_walks_no_weight():
    """With weights on their way (a prefetch stream's requests), a ``server_state`` after the first reads the queued
    weights' bytes left only; an acknowledgement moves the key and still walks no list of every weight."""
    g = _graph()
    sess = SimpleNamespace(held=set())
    ups = UploadScheduler(g, SimpleNamespace(session=sess))
    ups.sha_names = _Walked(ups.sha_names)
    shas = list(ups.sha_names)
    for sha in shas[:3]:
        ups.queued[sha] = SimpleNamespace(remaining=50)
    sess.held.add(shas[5])
    first = ups.server_state()
    _Walked.walks = 0
    ups.queued[shas[0]].remaining = 10
    again = ups.server_state()
    assert _Walked.walks == 0
    assert again.held == first.held and again.in_flight[ups.sha_names[shas[0]][0]] == 10
    sess.held.add(shas[1])  # acknowledged
    after = ups.server_state()
    assert _Walked.walks == 0
    assert after == _by_definition(ups)


def _sent_by_definition(tr: Trajectory, state: ServerState) -> float:
    held, infl = state.held, state.in_flight
    return float(sum(b if w in held else b - min(b, int(infl.get(w, b))) for w, b in tr.sizes))


def test_trajectory_sent_from_what_the_held_set_added_is_the_per_weight_definition():
    rng = random.Random(7)
    names = [f"w{i}" for i in range(60)]
    for dup in (False, True):
        sizes = tuple((w, rng.randint(0, 1000)) for w in rng.sample(names, 40))
        if dup:
            sizes += (sizes[0],)
        tr = Trajectory(key=(), choice=None, remaining=10, sizes=sizes, x=100.0, m=4, local_ms=1.0,
                        send_ms_per_byte=0.0)
        held: set[str] = set()
        for _ in range(300):
            r = rng.random()
            if r < 0.7:
                held |= set(rng.sample(names, rng.randint(0, 3)))  # grows
            elif r < 0.85:
                held = set(rng.sample(names, rng.randint(0, 50)))  # jumps
            elif held:
                held.discard(rng.choice(sorted(held)))  # shrinks
            infl = {w: rng.choice([rng.randint(0, 1200), float(rng.randint(0, 1200))])
                    for w in rng.sample(names, rng.randint(0, 10)) if w not in held or rng.random() < 0.2}
            st = ServerState(held=frozenset(held), in_flight=infl)
            assert tr.sent(st) == _sent_by_definition(tr, st)
            assert tr.sent(st) == _sent_by_definition(tr, st)  # (the kept sum)


def test_warm_split_requests_of_a_session_upload_pass_over_no_queue(server, monkeypatch):
    """A real client (auto, a CPU-shared UE whose warm plans park background weights while it computes) that
    uploaded its target through its session: once every weight is held, its warm split requests neither re-key
    nor filter the empty uplink queue (``UplinkQueue.rekey`` / ``drop``: a lock and two heap rebuilds each, on
    every warm request before session 22), nor walk the weights it queued; the answers are the eager module's."""
    from partitioner.uecpu import UeCpu
    from ue_client import CoinferClient, new_tenant
    from ue_client.session import UplinkQueue

    with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                       ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False, probe=False,
                       send_cpu=UeCpu(send_ms_per_byte=1e-5), horizon=12) as c:
        x = c.example_inputs[0].clone()
        for _ in range(3):
            c(x)
        assert c.engine.uploads.wait_uploads(60)
        c(x)
        assert c.engine.uploads.queued and c.last_report.server_ops > 0  # (weights went up on the session)
        calls = {"rekey": 0, "drop": 0}
        for name in calls:
            orig = getattr(UplinkQueue, name)

            def counting(self, *a, _name=name, _orig=orig, **k):
                calls[_name] += 1
                return _orig(self, *a, **k)

            monkeypatch.setattr(UplinkQueue, name, counting)
        for _ in range(3):
            y = c(x)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback
            torch.testing.assert_close(y, c.eager(x), rtol=1e-4, atol=1e-4)
        assert calls == {"rekey": 0, "drop": 0}
