"""One process-wide lock around everything that touches torch's global tracing state.

torch keeps tracing state in process globals: while ``torch.export`` runs in any thread,
``torch.compiler.is_exporting()`` is True in every thread, and each dynamo-disabled function (many
Python meta kernels: linear, gelu, layer_norm, SDPA...) then enters ``torch.fx.traceback.annotate``,
which adds and deletes the global ``current_meta["custom"]``. Meta propagation (slice validation) in
one thread racing an export in another fails with ``KeyError: 'custom'`` in either thread, or leaks
annotations into the exported graph. ``capture`` and ``validate`` both hold this lock. Re-entrant.
"""

from __future__ import annotations

import threading

TORCH_TRACE_LOCK = threading.RLock()
