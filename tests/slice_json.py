"""Builders of a ProfileGraph slice's JSON pieces, as an attacker's raw client writes them (test_attack15/16)."""

from __future__ import annotations


def meta(shape, dtype="float32"):
    """A tensor's metadata entry: its shape (list of ints) and dtype name."""
    return {"shape": list(shape), "dtype": dtype}


def zeros(name, shape, dtype="float32"):
    """A factory op: the tensor costs the attacker a few bytes of JSON, not an upload."""
    return {"name": name, "target": "aten.zeros.default", "args": [list(shape)],
            "kwargs": {"dtype": {"dtype": dtype}, "device": {"device": None}, "pin_memory": False},
            "outputs": [meta(shape, dtype)]}
