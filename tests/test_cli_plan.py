"""`coinfer-ue plan`: JSON shape, the what-if label, a server profile from `coinfer-ue profile --json`,
and bad input ending with exit 2 and one clear line on stderr."""

from __future__ import annotations

import json

import pytest

from partitioner.planners import POLICIES
from ue_client.cli import EXIT_BAD_INPUT, main

DIAMOND = "modelgraph.zoo:diamond"
ROW_KEYS = {"policy", "predicted_ms", "cold_ms", "warm_ms", "decision_ms", "server_ops", "upload_bytes",
            "sent_tensor_bytes"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))


def plan_args(*extra: str, model: str = DIAMOND) -> list[str]:
    return ["plan", "--model", model, "--uplink-mbps", "20", "--rtt-ms", "40", "--runs", "3", *extra]


def test_plan_all_policies_json_shape_and_what_if_label(tmp_path, capsys):
    out = tmp_path / "plans.json"
    rc = main(plan_args("--server-speedup", "5", "--policy", "all", "--deadline-ms", "1000", "--json", str(out)))
    assert rc == 0
    text = capsys.readouterr().out
    assert "what-if" in text and "/ 5" in text
    d = json.loads(out.read_text())
    assert {"model", "ops", "plans"} <= set(d)
    assert d["model"] == "diamond" and d["ops"] == 11
    assert "what-if" in d["server_costs"]
    assert [r["policy"] for r in d["plans"]] == list(POLICIES)
    by = {r["policy"]: r for r in d["plans"]}
    for r in d["plans"]:
        assert set(r) >= ROW_KEYS, r["policy"]
        assert r["feasible"], (r["policy"], r["reason"])
        assert r["cold_ms"] >= r["warm_ms"] - 1e-9
        assert r["decision_ms"] >= 0
        assert isinstance(r["server_ops"], list)
        assert r["upload_bytes"] >= 0 and r["sent_tensor_bytes"] >= 0
        assert r["cold_ms"] >= by["optimal"]["cold_ms"] - 1e-9, r["policy"]
    assert by["local"]["server_ops"] == [] and by["local"]["upload_bytes"] == 0
    assert by["cic"]["warm_ms"] == pytest.approx(by["dads"]["warm_ms"])
    assert by["mjoa"]["cold_ms"] == pytest.approx(by["optimal"]["cold_ms"])
    assert by["optimal"]["exact"] is True


def test_plan_policy_list_and_robust_without_deadline(tmp_path):
    out = tmp_path / "p.json"
    assert main(plan_args("--server-speedup", "5", "--policy", "dads,cic,robust", "--json", str(out))) == 0
    rows = json.loads(out.read_text())["plans"]
    assert [r["policy"] for r in rows] == ["dads", "cic", "robust"]
    assert rows[2]["feasible"] is False and "deadline" in rows[2]["reason"]


def test_plan_with_a_server_profile_from_the_profile_command(tmp_path, capsys):
    prof = tmp_path / "server.json"
    assert main(["profile", "--model", DIAMOND, "--runs", "3", "--json", str(prof)]) == 0
    capsys.readouterr()
    out = tmp_path / "plans.json"
    assert main(plan_args("--server-profile", str(prof), "--policy", "local,dads,mjoa", "--json", str(out))) == 0
    text = capsys.readouterr().out
    assert "what-if" not in text and "profiled" in text
    d = json.loads(out.read_text())
    assert d["server_costs"].startswith("profiled") and str(prof) in d["server_costs"]
    # the server "profile" was taken on this machine: offloading cannot beat local compute by much
    by = {r["policy"]: r for r in d["plans"]}
    assert by["mjoa"]["cold_ms"] <= by["local"]["cold_ms"] + 1e-9


def bad(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coinfer-ue plan: error:")
    return lines[0]


def test_unknown_policy(capsys):
    line = bad(capsys, plan_args("--server-speedup", "5", "--policy", "dads,bogus"))
    assert "unknown policy 'bogus'" in line and "mjoa" in line


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--uplink-mbps", "0", "--uplink-mbps must be a finite number > 0"),  # named since session 32, before the
    ("--downlink-mbps", "0", "--downlink-mbps must be a finite number > 0"),  # capture (was after the UE profile)
    ("--rtt-ms", "-5", "--rtt-ms must be a finite number >= 0"),
    ("--server-speedup", "0", "--server-speedup must be a finite number > 0"),
])
def test_bad_numbers(capsys, flag, value, needle):
    argv = plan_args("--policy", "dads")
    if flag != "--server-speedup":
        argv += ["--server-speedup", "5"]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert needle in bad(capsys, argv)


def test_server_profile_of_another_model(tmp_path, capsys):
    prof = tmp_path / "chain.json"
    assert main(["profile", "--model", "modelgraph.zoo:chain", "--runs", "3", "--json", str(prof)]) == 0
    capsys.readouterr()
    line = bad(capsys, plan_args("--server-profile", str(prof), "--policy", "dads"))
    assert "server profile" in line and "same model" in line


def test_server_profile_of_the_same_model_at_another_input_shape(tmp_path, capsys):
    """Same op names, different shapes: the model hash tells them apart (it used to be accepted)."""
    prof = tmp_path / "diamond64.json"
    assert main(["profile", "--model", DIAMOND, "--input-shape", "1,3,64,64", "--runs", "3", "--json",
                 str(prof)]) == 0
    capsys.readouterr()
    line = bad(capsys, plan_args("--server-profile", str(prof), "--policy", "dads"))
    assert "server profile" in line and "input shape" in line


def test_unreadable_server_profile(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert "nope.json" in bad(capsys, plan_args("--server-profile", str(missing), "--policy", "dads"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[1, 2, 3]")
    assert "expected a profile JSON" in bad(capsys, plan_args("--server-profile", str(garbage), "--policy", "dads"))


def test_a_boolean_time_in_a_server_profile_is_refused(tmp_path, capsys):
    """``float(true)`` is 1.0: a boolean was read as a 1 ms op."""
    prof = tmp_path / "bool.json"
    prof.write_text(json.dumps({"add": [True, 0.0]}))
    line = bad(capsys, plan_args("--server-profile", str(prof), "--policy", "dads"))
    assert "op 'add' has mean_ms=True (must be a number)" in line, line


def test_plan_with_an_off_allowlist_op_plans_the_rest_and_names_it(server, tmp_path, capsys):
    """The server profiles every op but the one off its allowlist; the plan covers the others, and the
    output and JSON name the op and how many ops it kept on the UE."""
    from modelgraph.allowlist import is_allowed
    from tests import user_zoo as uz

    out = tmp_path / "plans.json"
    rc = main(plan_args("--server", server.address, "--policy", "offload", "--json", str(out),
                        model=uz.spec("pinned_mid")))
    stdout = capsys.readouterr().out
    assert rc == 0 and not is_allowed(uz.OFF_ALLOWLIST)
    d = json.loads(out.read_text())
    (p,) = d["pinned"]
    assert p["target"] == uz.OFF_ALLOWLIST and p["kept_on_ue"] == 3  # cumprod, the linear and softmax after it
    (row,) = d["plans"]
    assert d["ops"] == len(row["server_ops"]) == 7 and p["op"] not in row["server_ops"]
    assert f"{p['op']} ({uz.OFF_ALLOWLIST}) kept 3 ops on the UE" in stdout
