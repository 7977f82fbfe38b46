"""`coinfer-ue run`: serve a stream of requests through an edge server and print what happened.

Hooked into ``ue_client.cli`` (which owns the parser, logging and error handling) by
``add_run_parser``. Output: one table row per request; ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ue_client.errors import InputError
from ue_client.options import DEFAULTS, ClientOptions, LinkOverride
from ue_client.planning import POLICIES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_run_parser(sub, add_model_args, add_common) -> None:
    """Add ``run`` to the ``coinfer-ue`` subparsers; its defaults are ``ClientOptions()``'s."""
    p = sub.add_parser("run", help="run requests split between this device and an edge server")
    add_model_args(p)
    p.add_argument("--server", required=True, help="edge server HOST:PORT")
    p.add_argument("--policy", default=DEFAULTS.policy, choices=list(POLICIES),
                   help=f"partitioning policy (default {DEFAULTS.policy}; auto: mjoa + progressive offloading)")
    p.add_argument("--requests", type=int, default=1, help="number of requests (default 1)")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between requests (default 0)")
    p.add_argument("--input", default="random", help="random, an image (.jpg/.png) or a tensor file (.pt)")
    p.add_argument("--verify", action="store_true", help="compare every result with local execution")
    p.add_argument("--uplink-mbps", type=float, help="override the uplink estimate used for planning")
    p.add_argument("--rtt-ms", type=float, help="override the RTT estimate used for planning")
    p.add_argument("--deadline-ms", type=float, default=DEFAULTS.deadline_ms,
                   help=f"give up on the server after this long (default: max({DEFAULTS.deadline_factor:g}x "
                        f"predicted, predicted + {DEFAULTS.deadline_slack_ms:g} ms))")
    p.add_argument("--tenant", default=DEFAULTS.tenant,
                   help=f"weight namespace on the server (default {DEFAULTS.tenant!r})")
    p.add_argument("--ue-slowdown", type=float, default=DEFAULTS.ue_slowdown,
                   help="emulate a device this many times slower than this CPU (demos on one machine)")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of computing locally")
    p.add_argument("--keep-session", action="store_true",
                   help="keep the session open while plans stay local (default: close it, re-open on demand)")
    p.add_argument("--json", type=Path, help="write the per-request report here")
    add_common(p)
    p.set_defaults(func=cmd_run)


# ---- inputs ----------------------------------------------------------------------------------------
def load_inputs(source: str, example: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``random`` (seeded), an image resized to the model's input, or a ``.pt`` tensor file."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(x.shape, generator=g, dtype=x.dtype) if x.is_floating_point() else x.clone()
                     for x in example)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"input file {source!r} does not exist (use 'random', an image or a .pt file)")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return _load_pt(path, example)
    if suffix in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
        return (_load_image(path, example),)
    raise InputError(f"input {source!r}: unsupported file type {suffix!r} (use .jpg/.png or .pt)")


def _load_pt(path: Path, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # the user's own file; no code runs
    except Exception as e:
        raise InputError(f"cannot read tensor file {str(path)!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if isinstance(obj, torch.Tensor):
        obj = (obj,)
    if isinstance(obj, dict):
        obj = tuple(obj.values())
    if not isinstance(obj, list | tuple) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise InputError(f"{str(path)!r} must hold a tensor, or a list/tuple/dict of tensors")
    if len(obj) != len(example):
        raise InputError(f"{str(path)!r} holds {len(obj)} tensors; the model takes {len(example)}")
    for i, (t, x) in enumerate(zip(obj, example)):
        if t.dim() == x.dim() - 1 and tuple(t.shape) == tuple(x.shape[1:]):
            obj = (*obj[:i], t.unsqueeze(0), *obj[i + 1:])
        elif tuple(t.shape) != tuple(x.shape):
            raise InputError(f"{str(path)!r}: tensor {i} has shape {list(t.shape)}; the model expects "
                             f"{list(x.shape)}")
    return tuple(t.to(x.dtype).contiguous() for t, x in zip(obj, example))


def _load_image(path: Path, example: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = example[0]
    if len(example) != 1 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise InputError(f"an image input needs a model with one (N, C, H, W) input; this one takes "
                         f"{[list(t.shape) for t in example]}")
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow (pip install pillow)") from None
    try:
        img = Image.open(path).convert("RGB" if x.shape[1] == 3 else "L")
    except Exception as e:
        raise InputError(f"cannot read image {str(path)!r}: {e}") from None
    h, w = int(x.shape[2]), int(x.shape[3])
    img = img.resize((w, h), Image.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, -1).permute(2, 0, 1)
    t = t.to(torch.float32) / 255.0
    if x.shape[1] == 3:
        t = (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.unsqueeze(0).expand(x.shape[0], -1, -1, -1).contiguous().to(x.dtype)


# ---- output ----------------------------------------------------------------------------------------
def max_abs_diff(a, b) -> float:
    a = a if isinstance(a, tuple | list) else (a,)
    b = b if isinstance(b, tuple | list) else (b,)
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


HEADER = (f"{'#':>3} {'policy':<12} {'srv/ue ops':>11} {'upload MB':>9} {'bg MB':>6} {'tensor KB':>9} "
          f"{'pred ms':>8} {'meas ms':>8} {'max|diff|':>9}  note")


def format_row(rep) -> str:
    diff = "-" if rep.max_abs_diff_vs_local is None else f"{rep.max_abs_diff_vs_local:.2g}"
    pred = "-" if rep.predicted_ms is None else f"{rep.predicted_ms:.1f}"
    note = f"FALLBACK: {rep.fallback_reason}" if rep.fallback else (rep.fallback_reason or "")
    return (f"{rep.request:>3} {rep.policy:<12} {f'{rep.server_ops}/{rep.ue_ops}':>11} "
            f"{rep.uploaded_weight_bytes / 1e6:>9.2f} {rep.background_bytes / 1e6:>6.2f} "
            f"{rep.sent_tensor_bytes / 1e3:>9.1f} {pred:>8} {rep.measured_ms:>8.1f} {diff:>9}  {note[:80]}")


def json_report(model: str, server: str, link, reports) -> dict:
    """The report file: exactly these keys (documented in the README of the CLI)."""
    return {
        "model": model,
        "server": server,
        "link": {"uplink_mbps": None if link is None else link.uplink_mbps,
                 "rtt_ms": None if link is None else link.rtt_ms},
        "requests": [{
            "policy": r.policy, "server_ops": r.server_ops, "ue_ops": r.ue_ops,
            "uploaded_weight_bytes": r.uploaded_weight_bytes, "sent_tensor_bytes": r.sent_tensor_bytes,
            "predicted_ms": r.predicted_ms, "measured_ms": r.measured_ms,
            "max_abs_diff_vs_local": r.max_abs_diff_vs_local, "fallback": r.fallback,
        } for r in reports],
    }


class _Progress:
    """An upload progress bar (tqdm) while a request runs; nothing when stdout is not a terminal or the
    upload is small (< ``MIN_BYTES``). A daemon thread polls ``engine.upload_status()`` every 0.2 s."""

    MIN_BYTES = 4e6

    def __init__(self, engine, enabled: bool):
        self.engine = engine
        self.enabled = enabled and hasattr(engine, "upload_status")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: tqdm | None = None

    def __enter__(self):
        if self.enabled:
            self._base = self.engine.upload_status()[0]
            self._thread = threading.Thread(target=self._run, name="coinfer-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            sent, waiting = self.engine.upload_status()
            sent -= self._base
            if waiting <= 0 or sent + waiting < self.MIN_BYTES:
                continue
            if self._bar is None:
                self._bar = tqdm(total=sent + waiting, desc="  uploading weights", unit="B", unit_scale=True,
                                 leave=False, file=sys.stdout, dynamic_ncols=True)
            self._bar.total = sent + waiting
            self._bar.n = sent
            self._bar.refresh()

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._bar is not None:
                self._bar.close()


def cmd_run(args: argparse.Namespace) -> int:
    from ue_client.client import CoinferClient

    if args.requests < 1:
        raise InputError("--requests must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    override = None
    if args.uplink_mbps is not None or args.rtt_ms is not None:
        override = LinkOverride(uplink_mbps=args.uplink_mbps, rtt_ms=args.rtt_ms)
    example = None
    if args.input_shape is not None:
        example = (torch.randn(args.input_shape),)
    options = ClientOptions(policy=args.policy, link=override, tenant=args.tenant, deadline_ms=args.deadline_ms,
                            threads=args.threads, ue_slowdown=args.ue_slowdown, fallback=not args.no_fallback,
                            horizon=args.requests, suspend_idle=not args.keep_session)
    client = CoinferClient(args.model, example, server=args.server, options=options, weights=args.weights)
    inputs = load_inputs(args.input, client.example_inputs)
    print(f"{client.graph.name}: {len(client.graph.ops)} ops, {client.graph.total_weight_bytes / 1e6:.1f} MB "
          f"weights; server {args.server}, policy {args.policy}", flush=True)
    print(HEADER, flush=True)
    reports = []
    try:
        for i in range(args.requests):
            if i and args.interval_ms > 0:
                time.sleep(args.interval_ms / 1e3)
            x = inputs if args.input != "random" or i == 0 else load_inputs("random", client.example_inputs, i)
            with _Progress(client.engine, sys.stdout.isatty()):
                y = client(*x)
            rep = client.last_report
            if args.verify:
                rep.max_abs_diff_vs_local = max_abs_diff(y, client.reference(*x))
            reports.append(rep)
            print(format_row(rep), flush=True)
        link = client.link
    finally:
        client.close()
    if link is not None:
        print(f"link estimate: uplink {link.uplink_mbps:.1f} Mbps, rtt {link.rtt_ms:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(json_report(args.model, args.server, link, reports), indent=1))
        print(f"wrote {args.json}")
    return 0
