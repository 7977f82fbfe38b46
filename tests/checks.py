"""Checks shared by the tests that run a real client: its answers against the user's own model."""

from __future__ import annotations


def checked_call(c, seed: int):
    """Run ``c`` (a ``CoinferClient``) on random inputs of ``seed`` shaped as its examples; the answer must
    equal the captured graph's (``c.reference``) bit for bit and the user's own eager module within 1e-4
    (float32 summation order). Returns the request's ``RequestReport``."""
    from ue_client.cli_run import load_inputs, max_abs_diff

    x = load_inputs("random", c.example_inputs, seed=seed)
    y = c(*x)
    assert max_abs_diff(y, c.reference(*x)) == 0.0
    assert max_abs_diff(y, c.eager(*x)) <= 1e-4  # the user's own module
    return c.last_report
