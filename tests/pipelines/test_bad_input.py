"""Bad input across every command (issue 14, Deliver 7): each case is one kind of mistake a careless or
hostile user makes. Every case asserts the exit code (2: bad input), that the one message names the
thing (file / option / field) and the fix, that no traceback is printed, and that nothing in the shared
world (run folders, store, release files, policy) changed: every file and folder is hashed before and
after, and an output the command was refused to write must not appear.

The world is built once per module: a fresh tiny policy, a finished 2-step `rl-train` run folder, one
whose checkpoints are all damaged, a 40-prompt arith store, a tiny V0-release folder and bad files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from click.testing import CliRunner

from pipelines.cli import main

W = dict[str, Path]

pytestmark = pytest.mark.slow  # end to end through the CLI: `make test` runs it, `make test-fast` leaves it out


class Case(NamedTuple):
    kind: str
    args: Callable[[W], list]
    needles: tuple[str, ...]  # every one must appear in the output (case-insensitive): the thing and the fix
    code: int = 2
    lock: str | None = None  # hold the lock of this run folder while the command runs
    needs_no_gpu: bool = False
    xfail: str | None = None


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 (files), "dir" (folders) or "lock" (lock files: only their existence counts,
    since a store's lock may record its holder's pid), for everything below `root`."""
    def state(p: Path) -> str:
        if p.is_dir():
            return "dir"
        return "lock" if p.name.endswith(".lock") else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): state(p) for p in sorted(root.rglob("*"))}


def invoke(args: list, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


# ====================================================================================== the world

RL_BASE = ["--algorithm", "grpo", "--rollouts-per-step", "8", "--group-size", "4", "--set", "tasks_path=n_prompts=40",
           "--set", "evaluation.prompts=0", "--set", "sampling.max_new_tokens=3", "--set", "save_every=1",
           "--steps", "2", "--no-progress", "--threads", "1"]
ROW = {"id": 0, "score": 0.2, "type": "context", "model": "m", "step": 1, "dataset": "ds"}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_release(rel: Path) -> None:
    """A tiny V0-release folder (6 prompts, one (model, step)) and bad score / prompt-dict files next to it."""
    rel.mkdir()
    (rel / "prompt_dict.json").write_text(json.dumps({f"ds_{i}": f"what is {i} + 1?" for i in range(6)}))
    jsonl(rel / "context.jsonl", [{**ROW, "id": i} for i in range(4)])
    jsonl(rel / "train.jsonl", [{**ROW, "id": i, "type": "train_query"} for i in (4, 5)])
    jsonl(rel / "queries.jsonl", [{k: v for k, v in ROW.items() if k != "score"} | {"id": i} for i in (4, 5)])
    (rel / "empty.jsonl").write_text("")
    (rel / "latin1.jsonl").write_bytes(json.dumps({**ROW, "model": "MODEL"}).replace("MODEL", "m\udce9").encode(
        "utf-8", "surrogateescape") + b"\n")
    (rel / "huge.jsonl").write_text(json.dumps({**ROW, "step": 10**30}) + "\n")
    (rel / "nan.jsonl").write_text(json.dumps({**ROW, "score": float("nan")}) + "\n")  # JSON's non-standard NaN
    (rel / "malformed.jsonl").write_text(json.dumps(ROW) + "\n{not json\n")
    jsonl(rel / "q_unknown_key.jsonl", [{**ROW, "id": 99, "type": "train_query"}])
    jsonl(rel / "q_other_model.jsonl", [{**ROW, "id": 4, "model": "other", "type": "train_query"}])
    jsonl(rel / "q_no_model.jsonl", [{k: v for k, v in ROW.items() if k != "model"}])
    (rel / "pd_list.json").write_text(json.dumps(["what is 1 + 1?"]))
    (rel / "pd_latin1.json").write_bytes(b'{"ds_0": "caf\xe9"}')
    (rel / "garbage.pt").write_bytes(b"this is not a checkpoint")
    nodict = rel / "no_prompt_dict"
    nodict.mkdir()
    jsonl(nodict / "context.jsonl", [ROW])


def make_configs(cfg: Path) -> None:
    cfg.mkdir()
    (cfg / "dup.yaml").write_text("rl:\n  steps: 3\n  optim:\n    lr: 1.0e-4\n  steps: 5\n")
    (cfg / "unknown.yaml").write_text("rl:\n  stepz: 3\n")
    (cfg / "syntax.yaml").write_text("rl:\n  steps: [1,\n")
    (cfg / "latin1.yaml").write_bytes(b"rl:\n  policy: caf\xe9\n")
    (cfg / "v0dup.yaml").write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    (cfg / "build_dup.yaml").write_text("build_data:\n  steps: 1\n  steps: 2\n")
    (cfg / "roll_half.jsonl").write_text(json.dumps({"model": "m", "step": 0, "dataset": "arith",
                                                     "prompt": "1+1=", "reward": 0.5}) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> W:
    from v05_rl.policies import PolicySpec, build_policy

    root = tmp_path_factory.mktemp("world")
    pol = root / "policy"
    model, tok = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=0)
    model.save_pretrained(pol)
    tok.save_pretrained(pol)
    for name in ("run", "run_damaged"):
        res = invoke(["rl-train", "--out", root / name, "--policy", pol, *RL_BASE])
        assert res.exit_code == 0, res.output
    for pt in (root / "run_damaged" / "checkpoints").glob("step_*.pt"):
        pt.write_bytes(pt.read_bytes()[:200])  # truncated: every checksum fails
    res = invoke(["data", "import", "n_prompts=20", "--source", "arith", "--store", root / "store"])
    assert res.exit_code == 0, res.output
    make_release(root / "rel")
    make_configs(root / "cfg")
    (root / "emptydir").mkdir()
    return {"root": root, "pol": pol, "run": root / "run", "bad_run": root / "run_damaged", "store": root / "store",
            "rel": root / "rel", "cfg": root / "cfg", "new": root / "new-out", "empty": root / "emptydir"}


def rl(w: W, *extra, out: str = "new") -> list:
    return ["rl-train", "--out", w[out], "--policy", w["pol"], *RL_BASE, *extra]


def predict(w: W, context="context.jsonl", queries="queries.jsonl", prompts="prompt_dict.json",
            checkpoint="garbage.pt", *extra) -> list:
    r = w["rel"]
    return ["predict-v0", "--checkpoint", r / checkpoint, "--context", r / context, "--queries", r / queries,
            "--prompts", r / prompts, "--out", w["new"] / "pred.jsonl", *extra]


def pretrain(w: W, release="rel", *extra) -> list:
    return ["pretrain-v0", "--release", w["rel"] / release if release != "rel" else w["rel"],
            "--out", w["new"] / "v0.pt", *extra]


CASES = [
    # ---------------------------------------------------------------- the command line itself
    Case("unknown command", lambda w: ["no-such"], ("no such command", "no-such", "--help")),
    Case("unknown option", lambda w: rl(w, "--stepz", "3"), ("--stepz", "did you mean", "--steps")),
    Case("missing required option", lambda w: ["rl-train"], ("missing option", "--out")),
    # ---------------------------------------------------------------- rl-train: the run folder
    Case("fresh start over an existing run", lambda w: rl(w, out="run"), ("already holds a run", "--resume", "--out")),
    Case("resume with a changed config", lambda w: rl(w, "--resume", "--lr", "5e-4", out="run"),
         ("optim.lr", "same settings", "new --out")),
    Case("run folder in use", lambda w: rl(w, "--resume", "--steps", "3", out="run"),
         ("in use by another run", "another --out"), lock="run"),
    Case("resume with every checkpoint damaged", lambda w: rl(w, "--resume", out="bad_run"),
         ("no intact checkpoint", "step_0000002.pt", "new --out")),
    # ---------------------------------------------------------------- rl-train: options and configs
    Case("absurd learning rate", lambda w: rl(w, "--lr", "1e30"), ("--lr", "1e+30", "1e-4")),
    Case("non-finite learning rate", lambda w: rl(w, "--lr", "nan"), ("lr", "nan", "positive number")),
    Case("negative step count", lambda w: rl(w, "--steps", "-1"), ("--steps", "-1", "x>=0")),
    Case("zero rollouts per step", lambda w: rl(w, "--rollouts-per-step", "0"), ("--rollouts-per-step", "x>=1")),
    Case("zero time limit", lambda w: rl(w, "--max-minutes", "0"), ("--max-minutes", "x>0")),
    Case("cuda without a GPU", lambda w: rl(w, "--device", "cuda"), ("--device", "no cuda gpu", "--device cpu"),
         needs_no_gpu=True),
    Case("unknown device", lambda w: rl(w, "--device", "tpu9"), ("--device", "tpu9", "cpu, cuda")),
    Case("duplicate YAML key", lambda w: rl(w, "--config", w["cfg"] / "dup.yaml"),
         ("dup.yaml", "line 5", "duplicate key 'steps'", "line 2", "keep one")),
    Case("unknown YAML key", lambda w: rl(w, "--config", w["cfg"] / "unknown.yaml"),
         ("unknown.yaml", "unknown key 'stepz'", "did you mean 'steps'")),
    Case("YAML syntax error", lambda w: rl(w, "--config", w["cfg"] / "syntax.yaml"), ("syntax.yaml", "line 3")),
    Case("config not UTF-8", lambda w: rl(w, "--config", w["cfg"] / "latin1.yaml"), ("latin1.yaml", "utf-8")),
    Case("config file missing", lambda w: rl(w, "--config", w["cfg"] / "nosuch.yaml"),
         ("nosuch.yaml", "does not exist", "yaml file")),
    Case("--set without =", lambda w: rl(w, "--set", "steps"), ("--set", "'steps'", "KEY=VALUE")),
    Case("--set of the wrong type", lambda w: rl(w, "--set", "keep_checkpoints=abc"),
         ("'keep_checkpoints'", "expects int", "'abc'")),
    Case("--set of a duplicate nested key", lambda w: rl(w, "--set", "optim={lr: 1, lr: 2}"),
         ("--set", "duplicate key 'lr'", "keep one")),
    Case("unknown algorithm", lambda w: rl(w, "--algorithm", "ppo"), ("--algorithm", "'ppo'", "grpo")),
    Case("prior v0 without a checkpoint", lambda w: rl(w, "--algorithm", "v05", "--prior", "v0"),
         ("v0_checkpoint", "pretrain-v0")),
    Case("NaN prior noise", lambda w: rl(w, "--algorithm", "v05", "--prior", "oracle-noise", "--prior-noise-std", "nan"),
         ("noise_std", "nan", ">= 0")),
    Case("policy that does not exist", lambda w: rl(w, "--policy", w["root"] / "nosuch-policy"),
         ("nosuch-policy", "family member", "hub id")),
    Case("verl config on the local engine", lambda w: rl(w, "--config", "pipelines/configs/paper.yaml"),
         ("paper.yaml", "--engine verl")),
    Case("verl engine without a config", lambda w: ["rl-train", "--out", w["new"], "--engine", "verl"],
         ("--engine verl", "--config", "paper.yaml")),
    Case("local-engine options for verl",
         lambda w: ["rl-train", "--out", w["new"], "--engine", "verl", "--config", "pipelines/configs/paper.yaml",
                    "--group-size", "4"], ("--group-size", "hydra overrides")),
    # ---------------------------------------------------------------- build-data
    Case("build-data negative steps", lambda w: ["build-data", "--store", w["new"], "--steps", "-2"], ("--steps", "x>=0")),
    Case("build-data duplicate YAML key",
         lambda w: ["build-data", "--store", w["new"], "--config", w["cfg"] / "build_dup.yaml"],
         ("build_dup.yaml", "duplicate key 'steps'")),
    # ---------------------------------------------------------------- evaluate
    Case("evaluate prompts without answers",
         lambda w: ["evaluate", "--policy", w["pol"], "--tasks", "v0_release", "--path", w["rel"], "--split", "context",
                    "--out", w["new"] / "e.json"], ("--tasks", "v0_release", "data set(s) ds", "no answer", "arith")),
    Case("evaluate unknown task source", lambda w: ["evaluate", "--policy", w["pol"], "--tasks", "nosuch"],
         ("'nosuch'", "valid names", "arith")),
    Case("evaluate zero samples", lambda w: ["evaluate", "--policy", w["pol"], "--k", "0"], ("--k", "x>=1")),
    Case("evaluate top-p out of range", lambda w: ["evaluate", "--policy", w["pol"], "--top-p", "1.5"],
         ("--top-p", "1.5", "0<x<=1")),
    Case("evaluate negative prompt count", lambda w: ["evaluate", "--policy", w["pol"], "--n-prompts", "-3"],
         ("--n-prompts", "x>=1")),
    # ---------------------------------------------------------------- pretrain-v0
    Case("pretrain without a data source", lambda w: ["pretrain-v0", "--out", w["new"] / "v0.pt"],
         ("--store", "--release", "exactly one")),
    Case("holdout without a release", lambda w: ["pretrain-v0", "--store", w["store"], "--holdout", "train.jsonl",
                                                 "--out", w["new"] / "v0.pt"], ("--holdout", "needs --release")),
    Case("holdout that is not a score file", lambda w: pretrain(w, "rel", "--holdout", "other.jsonl"),
         ("--holdout", "other.jsonl", "context.jsonl")),
    Case("empty score file", lambda w: pretrain(w, "empty.jsonl"), ("empty.jsonl", "no training pairs", "v05 data import")),
    Case("score file not UTF-8", lambda w: pretrain(w, "latin1.jsonl"), ("latin1.jsonl", "line 1", "utf-8")),
    Case("integer too large", lambda w: pretrain(w, "huge.jsonl"), ("huge.jsonl", "line 1", "'step'", "64-bit", "fix")),
    Case("NaN score", lambda w: pretrain(w, "nan.jsonl"), ("nan.jsonl", "line 1", "'score'", "[-1, 1]")),
    Case("malformed JSON line", lambda w: pretrain(w, "malformed.jsonl"),
         ("malformed.jsonl", "line 2", "malformed json", "one json object per line")),
    Case("release without a prompt dict", lambda w: pretrain(w, "no_prompt_dict"),
         ("prompt_dict.json", "missing", "fix")),
    Case("pretrain duplicate YAML key", lambda w: pretrain(w, "rel", "--config", w["cfg"] / "v0dup.yaml"),
         ("v0dup.yaml", "line 3", "duplicate key 'max_steps'")),
    Case("pretrain store that does not exist",
         lambda w: ["pretrain-v0", "--store", w["root"] / "nostore", "--out", w["new"] / "v0.pt"],
         ("nostore", "catalog.duckdb", "v05 data import")),
    Case("pretrain zero steps", lambda w: pretrain(w, "rel", "--max-steps", "0"), ("--max-steps", "x>=1")),
    # ---------------------------------------------------------------- predict-v0
    Case("predict with an empty context file", lambda w: predict(w, context="empty.jsonl"),
         ("empty.jsonl", "no rows", "context rows")),
    Case("query key missing from the prompt dict", lambda w: predict(w, queries="q_unknown_key.jsonl"),
         ("q_unknown_key.jsonl", "line 1", "ds_99", "add its text")),
    Case("query without context rows", lambda w: predict(w, queries="q_other_model.jsonl"),
         ("q_other_model.jsonl", "line 1", "no context row", "'other'")),
    Case("query row missing a field", lambda w: predict(w, queries="q_no_model.jsonl"),
         ("q_no_model.jsonl", "line 1", "'model'", "missing", "fix")),
    Case("prompt dict that is not an object", lambda w: predict(w, prompts="pd_list.json"),
         ("pd_list.json", "json object")),
    Case("prompt dict not UTF-8", lambda w: predict(w, prompts="pd_latin1.json"), ("pd_latin1.json", "utf-8")),
    Case("garbage V0 checkpoint", lambda w: predict(w), ("garbage.pt", "pretrain-v0")),
    Case("negative context size", lambda w: predict(w, "context.jsonl", "queries.jsonl", "prompt_dict.json",
                                                    "garbage.pt", "--max-context", "-5"), ("--max-context", "x>=1")),
    # ---------------------------------------------------------------- report, experiment, bench, demo
    Case("report on a folder without runs", lambda w: ["report", w["empty"], "--out", w["new"]],
         ("emptydir", "no run found", "metrics.jsonl")),
    Case("report on a missing folder", lambda w: ["report", w["root"] / "nosuch"], ("nosuch", "does not exist")),
    Case("unknown experiment", lambda w: ["experiment", "nosuch", "--dry-run", "--out", w["new"]],
         ("'nosuch'", "main", "yaml path")),
    Case("experiment seeds that are not integers",
         lambda w: ["experiment", "main", "--seeds", "a,b", "--dry-run", "--out", w["new"]], ("--seeds", "'a'")),
    Case("experiment with zero jobs", lambda w: ["experiment", "main", "--jobs", "0", "--dry-run", "--out", w["new"]],
         ("--jobs", "x>=1")),
    Case("bench with zero rollouts", lambda w: ["bench", "store", "--n", "0", "--out", w["new"] / "b.json"],
         ("--n", "x>=1")),
    Case("bench with negative prompts", lambda w: ["bench", "estimator", "--prompts", "-5"], ("--prompts", "x>=1")),
    Case("demo with zero jobs", lambda w: ["demo", "--jobs", "0", "--out", w["new"]], ("--jobs", "x>=1")),
    # ---------------------------------------------------------------- data commands (helper S1's code)
    Case("sql that writes", lambda w: ["sql", f"COPY prompts TO '{w['new']}.csv'", "--store", w["store"]],
         ("could write", "read-only", "fix")),
    Case("sql that reads outside the store", lambda w: ["sql", "SELECT * FROM read_csv('/etc/passwd')", "--store",
                                                        w["store"]], ("/etc/passwd", "only reads the store", "fix")),
    Case("sql negative row limit", lambda w: ["sql", "SELECT 1", "--store", w["store"], "--max-rows", "-1"],
         ("--max-rows", "x>=0")),
    Case("data info without a store", lambda w: ["data", "info", "--store", w["root"] / "nostore"],
         ("nostore", "catalog.duckdb", "v05 data import")),
    Case("import of a missing file", lambda w: ["data", "import", w["root"] / "nosuch.parquet", "--source", "parquet",
                                                "--store", w["store"]], ("nosuch.parquet", "fix")),
    Case("rollout reward that is not ±1", lambda w: ["data", "ingest-rollouts", w["cfg"] / "roll_half.jsonl",
                                                     "--store", w["store"]], ("roll_half.jsonl", "'reward'", "-1 or +1")),
    Case("NaN reward threshold", lambda w: ["data", "ingest-rollouts", w["cfg"] / "roll_half.jsonl", "--store",
                                            w["store"], "--threshold", "nan"], ("--threshold", "not a finite number")),
    Case("arith options given as --set", lambda w: ["data", "export-verl", "--source", "arith", "--set", "n_prompts=20",
                                                    "--out", w["new"] / "a.parquet"], ("--set", "PATH")),
]


def test_at_least_forty_kinds():
    assert len({c.kind for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", [pytest.param(c, id=c.kind, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(world, case):
    if case.needs_no_gpu:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    from v05_rl.engine.run_folder import RunLock

    before = snapshot(world["root"])
    if case.lock:
        with RunLock(world[case.lock]):
            res = invoke(case.args(world))
    else:
        res = invoke(case.args(world))
    out = res.output
    assert res.exit_code == case.code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out, out
    assert sum(line.startswith("Error:") for line in out.splitlines()) == 1, out  # one message
    for needle in case.needles:
        assert needle.lower() in out.lower(), f"{needle!r} not in:\n{out}"
    assert snapshot(world["root"]) == before


# ====================================================================================== unexpected errors and --debug


def boom(*args, **kwargs):
    raise ZeroDivisionError("division by zero in a recipe")


def test_an_unexpected_error_is_one_line_with_exit_code_1(world, monkeypatch):
    import pipelines.report

    monkeypatch.setattr(pipelines.report, "write_report", boom)
    res = invoke(["report", world["run"], "--out", world["new"]])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "Error: unexpected ZeroDivisionError: division by zero in a recipe "
        "(rerun with --debug (or V05_DEBUG=1) for the traceback)"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(world, monkeypatch, how):
    import pipelines.report

    monkeypatch.setattr(pipelines.report, "write_report", boom)
    args = ["report", world["run"], "--out", world["new"]]
    res = invoke(["--debug", *args]) if how == "flag" else invoke(args, env={"V05_DEBUG": "1"})
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)  # raised: click prints the traceback


def test_debug_prints_the_traceback_of_bad_input_too(world):
    res = invoke(["--debug", *rl(world, "--config", world["cfg"] / "unknown.yaml")])
    assert res.exit_code == 2
    assert "Traceback" in res.output and "unknown key 'stepz'" in res.output


def test_a_warning_is_one_line(world, tmp_path):
    """A damaged newest checkpoint: the resume warns in one line naming it, then continues (exit 0)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    newest = run / "checkpoints" / "step_0000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    res = invoke(["rl-train", "--out", run, "--policy", world["pol"], *RL_BASE, "--steps", "3", "--resume"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert any("step_0000002.pt" in line and "SHA-256" in line for line in warned), res.output
    assert any("resuming from" in line and "step_0000001.pt" in line for line in warned), res.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
