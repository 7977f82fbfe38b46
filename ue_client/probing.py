"""What the link and sending cost this device: estimates, the planning link, and the uplink probe.

The link estimate (``profiler.link.LinkEstimator``: RTT from pings, uplink rate from timed uploads)
and the send-CPU estimate (``profiler.link.SendCpuEstimator``: CPU seconds this process spends per
byte sent) are fed by one active probe when the first session opens (``probe_uplink``) and passively
by every request afterwards (``observe_upload``, ``observe_send``). ``planning_link`` is the estimate
with the user's ``LinkOverride`` applied.

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``); the queue watch's idle-RTT
callback (``observe_rtt``) is the one entry from another thread, and ``LinkEstimator`` locks it.
"""

from __future__ import annotations

import logging
import time

import torch

from modelgraph import ModelGraph, tensor_bytes
from partitioner import Link
from partitioner.uecpu import UeCpu
from profiler.link import LinkEstimator, SendCpuEstimator
from ue_client import wire
from ue_client.options import LinkOverride
from ue_client.session import FOREGROUND, SessionStream, UplinkItem

log = logging.getLogger(__name__)

DEFAULT_UPLINK_MBPS = 20.0
"""Uplink assumed before anything was measured."""
DEFAULT_RTT_MS = 1.0
PACE_HEADROOM = 1.15
"""Uplink pacing rate over the planning link's rate (the estimate can grow; the link's queue absorbs it)."""


def probe_weights(graph: ModelGraph, probe_bytes: int) -> list[tuple[str, str]]:
    """The weights the connect-time probe uploads: (sha256, weight name), each sha256 once, about
    ``probe_bytes`` of them (at least 64 KiB where the model has that much).

    The weights whose sizes are nearest the model's mean weight size (ties: nearer the output first), so
    the sample has as many weights per byte as the whole model: sending costs CPU per weight (its frames,
    the server's acknowledgement and its handling here) besides per byte, and the uploads the probe stands
    for (a prefetch, a cold request) send most of the model. Under a cost of a per byte + b per weight,
    the probe's CPU per byte is then about the model's a + b x (weights / bytes) (not where a few weights
    far above the mean hold most of the bytes: no small sample has the mean size then, and this one has
    more weights per byte than the model: googlenet 3.7 per MB against the model's 3.5, mobilenet_v2 4.8
    against 5.7, resnet18 0.85 against 0.64, at ``probe_bytes`` 1 MiB). A weight over 8 x
    ``probe_bytes`` is left out while others are there (it would make the probe, not the model, the
    upload). Before session 12 the probe took the weights nearest the output until ``probe_bytes``: for
    googlenet its classifier, 2 weights in 4.1 MB (0.5 weights per MB; the model: 3.5), and the send cost
    it kept was 1.03 ns/B against 1.55 for the model's other 22.4 MB sent the same way (10 % UE, TLS,
    data channel, 400 Mbit/s; ``bench/bench_send_beside.py``, docs/results/sendcost/session12).
    """
    g = graph
    seen: set[str] = set()
    order: list[tuple[str, str, int]] = []
    for op in reversed(g.ops):
        for w in op.weight_inputs:
            sha = g.weight_sha256(w)
            if sha not in seen:
                seen.add(sha)
                order.append((sha, w, g.weights[w].nbytes))
    if not order:
        return []
    mean = sum(x[2] for x in order) / len(order)
    cap = 8 * probe_bytes
    ranked = sorted(range(len(order)), key=lambda i: (order[i][2] > cap, abs(order[i][2] - mean), i))
    chosen, total = [], 0
    for i in ranked:
        if total >= max(probe_bytes, 64 << 10) or (chosen and order[i][2] > cap):
            break
        chosen.append(order[i])
        total += order[i][2]
    return [(sha, w) for sha, w, _ in chosen]


class LinkProbe:
    """The link and send-cost estimates of one client.

    ``override`` (a ``LinkOverride``; may be replaced between requests) replaces measured values for
    planning; ``send_cpu`` is a send cost known beforehand (a ``UeCpu``, e.g. measured by an earlier client):
    the estimate starts from it, and the client's own first measured send (``observe_send``: a prefetch's or an
    upload's, MBs beside a request) replaces it, later ones update it as an EWMA (``SendCpuEstimator``; its
    ``shared`` flag is kept, its per-weight part until the first sample, which measures the whole cost per
    byte). The first decision of a stream uses the given (or probed) cost; every decision after an upload, the
    stream's own. Until session 21 the first sample was blended 0.3 into the prior. Before session 18 it replaced the
    measurement for good: the testbed gives each stream the connect-time probe's cost, and within a stream
    the 1.05 ns/B it probed stayed while the requests' own sends measured ~1.3 (session 17's resnet18 cell; it
    drove session 16's prefetch choice). ``slowdown`` > 1 (an emulated slower device, whose sends run on
    this machine's CPU) leaves sending unmodelled unless ``send_cpu`` is given, and then fixed at it.
    """

    def __init__(self, override: LinkOverride | None, *, send_cpu: UeCpu | None, slowdown: float,
                 threads: int | None, pace: bool):
        self.override = override
        self.estimator = LinkEstimator()
        self.send_est = SendCpuEstimator()
        self._send_prior = send_cpu
        """The send cost given beforehand (None: measured only); seeds ``send_est`` on first use (``ue_cpu``)."""
        self._prior_seeded = False
        self._slowdown = slowdown
        self._threads = threads
        self._pace = pace
        self.probed = False
        """The active probe ran (once per client: a re-opened session knows the link and the send cost)."""
        self._applied: tuple | None = None
        """(estimate, override, the link planning uses) of the last ``planning_link``."""
        self._ue_cpu_memo: tuple | None = None
        """((send-cost samples, capacity, threads), ``ue_cpu`` of them): the same object while they stay."""
        self.sent_bytes = 0
        """Weight bytes the probe uploaded (requests report them: ``RequestReport.probe_bytes``)."""

    def planning_link(self) -> Link:
        """The link planning uses: the estimate (defaults before any measurement) with ``override``."""
        est = self.estimator.link(default_mbps=DEFAULT_UPLINK_MBPS, default_rtt_ms=DEFAULT_RTT_MS)
        o = self.override
        if o is None:
            return est
        last = self._applied
        if last is not None and last[0] is est and last[1] is o:
            return last[2]
        link = o.apply(est)
        self._applied = (est, o, link)  # the estimator gives the same ``Link`` while it did not move
        return link

    def report_link(self) -> dict[str, float]:
        """The planning link as a request report shows it."""
        link = self.planning_link()
        return {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms}

    def ue_cpu(self) -> UeCpu | None:
        """What sending costs this UE (None before it was measured).

        An emulated slow device (``slowdown`` > 1) sleeps most of its compute time and sends on this
        machine's CPU: its sending is not modelled (None) unless a cost was given (``send_cpu``).
        """
        prior = self._send_prior
        if prior is not None and self._slowdown > 1.0:
            return prior
        if self._slowdown > 1.0:
            return None
        est = self.send_est
        if prior is not None and not self._prior_seeded:
            self._seed(prior)
        if prior is not None and est.samples == 0:
            return prior  # nothing measured yet: the given cost as it was given
        key = (est.version, est.capacity, self._threads or torch.get_num_threads())
        memo = self._ue_cpu_memo
        if memo is not None and memo[0] == key and memo[1] is not None:  # the same object while no sample came
            return memo[1]
        cpu = est.ue_cpu(key[2])
        if prior is not None and cpu is not None:
            cpu = UeCpu(cpu.send_ms_per_byte, prior.shared)
        self._ue_cpu_memo = (key if est.capacity == key[1] else None, cpu)  # (capacity is set on first use)
        return cpu

    def _seed(self, prior: UeCpu) -> None:
        """Start ``send_est`` from ``prior``: its wall ms per byte at this process's CPU capacity back to CPU
        seconds per byte (``SendCpuEstimator.ue_cpu``'s conversion), with no sample counted."""
        from profiler.link import cpu_capacity

        est = self.send_est
        if est.capacity is None:
            est.capacity = cpu_capacity()
        est.seed(prior.send_ms_per_byte * max(1e-3, min(est.capacity, 1.0)) / 1e3)
        self._prior_seeded = True

    def rate_bps(self) -> float | None:
        """Uplink pacing rate, bytes/s (None: unpaced).

        Paced at the link's rate, not at the CPU-bound rate: gRPC pulls the next message only when the
        previous one was written, so a CPU-bound sender queues nothing inside gRPC, while pacing at an
        estimated CPU rate that was too low (measured: half of what the UE could send) slowed every upload.
        """
        if not self._pace:
            return None
        return self.planning_link().uplink_mbps * 125_000.0 * PACE_HEADROOM

    def observe_rtt(self, rtt_ms: float) -> None:
        self.estimator.observe_rtt(rtt_ms)

    def uplink_cv(self) -> float | None:
        """The measured uplink rate's relative spread (``LinkEstimator.uplink_cv``); None before enough
        samples or when the uplink rate is overridden (a given rate has no spread to measure)."""
        if self.override is not None and self.override.uplink_mbps is not None:
            return None
        return self.estimator.uplink_cv()

    def observe_upload(self, nbytes: int, seconds: float) -> None:
        """A timed upload (from the start of its busy period to the server's acknowledgement)."""
        self.estimator.observe_upload(nbytes, seconds, includes_rtt=True)

    def observe_send(self, nbytes: int, cpu_s: float) -> None:
        """``nbytes`` sent while this process spent ``cpu_s`` CPU seconds on nothing else."""
        self.send_est.observe(nbytes, cpu_s)

    def probe_uplink(self, graph: ModelGraph, stub, tenant: str, session: SessionStream, *, probe_bytes: int,
                     timeout_s: float, link: bool = True) -> set[str]:
        """Time an upload of a sample of the model's weights (:func:`probe_weights`: as many weights per
        byte as the whole model has): the uplink rate (``link``) and the CPU time this process spends per
        byte sent (nothing else runs). Returns the sha256 of the weights the server acknowledged (it holds
        them now).

        The CPU of an empty upload call (stream set-up, headers, the answer) is subtracted: counted as
        per-byte cost it overstated a 1 MB probe's cost about 2x on a 10 % CPU quota, and the client then
        paced its uplink at half of what its CPU could send.
        """
        g = graph
        chosen = probe_weights(g, probe_bytes)
        total = sum(g.weights[w].nbytes for _, w in chosen)
        self.probed = True
        if total < 64 << 10:
            return set()
        sender = getattr(session, "data_sender", None)
        if sender is not None and sender.active:
            return self._probe_data_channel(g, chosen, total, session, link)
        chunk = session.queue._chunk_size()  # the chunks the session would send at this rate

        def chunks():
            for sha, w in chosen:
                data = tensor_bytes(g.weight_values[w])
                meta = g.weights[w]
                for off, end in wire.chunk_spans(data.nbytes, chunk):
                    yield wire.encode_weight_chunk(sha, meta.dtype, meta.shape, off, data.nbytes, data[off:end],
                                                   field=wire.UPLOAD_CHUNK)  # encoded as the session's chunks

        sid = session.opened.session_id
        call_cpu = []
        for _ in range(2):
            c = time.process_time()
            wire.upload_weights(stub, tenant, sid, iter(()), timeout_s=timeout_s)
            call_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        acks = wire.upload_weights(stub, tenant, sid, chunks(), timeout_s=60.0)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        self.sent_bytes += total
        self.send_est.observe(total, max(0.25 * dc, dc - min(call_cpu)))
        if link:
            self.estimator.observe_upload(total, dt, includes_rtt=True)
        log.info("uplink probe: %d bytes in %.1f ms (%.1f ms CPU, %.1f ms of it the call's own) -> %.1f Mbps",
                 total, dt * 1e3, dc * 1e3, min(call_cpu) * 1e3, self.estimator.link().uplink_mbps)
        return {a.sha256 for a in acks}

    def _probe_data_channel(self, g: ModelGraph, chosen: list[tuple[str, str]], total: int, session: SessionStream,
                            link: bool) -> set[str]:
        """The probe when the session's weights go on its data channel (``ue_client.data_channel``): the
        same weights on that path, timed from queueing to the server's last acknowledgement, so the send
        cost measured is the one later uploads pay (the gRPC call's was ~3x a data channel's per byte). The
        send cost leaves out this thread's own CPU while it polls for the acknowledgements: in a request the
        UE computes meanwhile, and counted it was 2/3 of the probe's CPU at 20 Mbit/s (3.4 vs 1.1 ns/B,
        ``bench/bench_probe_cost.py``)."""
        q = session.queue
        items = []
        for k, (sha, w) in enumerate(chosen):
            meta = g.weights[w]
            items.append(UplinkItem("weight", sha, meta.dtype, meta.shape, tensor_bytes(g.weight_values[w]),
                                    (FOREGROUND, -2, k)))
        shas = {sha for sha, _ in chosen}
        q.unpaced = True  # as the bulk call: the link's rate, not the pace of the estimate before it
        try:
            t, c = time.perf_counter(), time.process_time()
            for it in items:
                q.put(it)
            end = time.monotonic() + 60.0
            w = time.thread_time()
            while not shas <= session.held and session.alive and time.monotonic() < end:
                time.sleep(0.002)
            waited = time.thread_time() - w  # this thread's own polling: no part of sending
            dt, dc = time.perf_counter() - t, time.process_time() - c
        finally:
            q.unpaced = False
        acked = shas & session.held
        if acked != shas:
            log.info("uplink probe on the data channel: %d of %d weights acknowledged", len(acked), len(shas))
            return acked
        q.delivered()
        self.sent_bytes += total
        self.send_est.observe(total, max(0.25 * dc, dc - waited))
        if link:
            self.estimator.observe_upload(total, dt, includes_rtt=True)
        log.info("uplink probe (data channel): %d bytes in %.1f ms (%.1f ms CPU, %.1f ms of it the wait's own) "
                 "-> %.1f Mbps", total, dt * 1e3, dc * 1e3, waited * 1e3, self.estimator.link().uplink_mbps)
        return acked
