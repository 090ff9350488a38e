"""The documented cluster command lines run through the real `v05` CLI (click parser, `_launch_verl`,
`pipelines.rl_train.launch_verl`, `v05_rl.verl.entry.launch`) up to where Ray would start: the docs
cannot drift from the parser. Every `v05 rl-train --engine verl ...` line of README.md, docs/cluster.md
and the verl YAML headers is run, with the placeholder V0 path replaced by a tiny real checkpoint and
`--out` moved under a temporary folder. Also: what `--out` / `--resume` mean for verl (issue 13 item 8)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

from click.testing import CliRunner  # noqa: E402

from tests.v05_rl.verl.tiny_v0 import tiny_v0_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DOCS = ("README.md", "docs/cluster.md", "pipelines/configs/paper.yaml", "pipelines/configs/grpo.yaml",
        "pipelines/configs/dapo.yaml")
PLACEHOLDER_V0 = "/path/to/v0.pt"


def documented_commands(text: str) -> list[str]:
    """`v05 rl-train --engine verl` command lines: backslash continuations joined, trailing comments and a
    YAML comment's leading `#` removed."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*#\s*", "", line) if line.lstrip().startswith("#") else line
        if line.strip().startswith("v05 rl-train --engine verl"):
            out.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return out


def cases() -> list[tuple[str, str]]:
    return [(doc, cmd) for doc in DOCS if (ROOT / doc).is_file() for cmd in documented_commands((ROOT / doc).read_text())]


def test_every_doc_shows_the_command():
    found = {doc for doc, _ in cases()}
    assert {"docs/cluster.md", "pipelines/configs/paper.yaml", "pipelines/configs/grpo.yaml",
            "pipelines/configs/dapo.yaml"} <= found
    for doc, cmd in cases():
        assert "--out " in cmd, f"{doc}: the documented command lacks the required --out: {cmd}"


@pytest.fixture(scope="module")
def v0_ckpt(tmp_path_factory):
    return tiny_v0_checkpoint(tmp_path_factory.mktemp("tiny_v0"))


def run_cli(cmd: str, v0_ckpt: Path, tmp_path: Path, monkeypatch) -> tuple:
    """Run a documented command through the `v05` click group; `launch` runs with dry_run=True (compose,
    validate, load the V0 checkpoint, check the run folder; no Ray). Returns (result, config or None)."""
    import v05_rl.verl.entry as entry
    from pipelines.cli import main

    args = shlex.split(cmd.replace(PLACEHOLDER_V0, str(v0_ckpt)))[1:]  # drop the program name `v05`
    i = args.index("--out")
    args[i + 1] = str(tmp_path / args[i + 1])
    real, seen = entry.launch, []

    def dry(path, overrides=(), *, dry_run=False):
        seen.append(real(path, overrides, dry_run=True))
        return seen[-1]

    monkeypatch.setattr(entry, "launch", dry)
    monkeypatch.chdir(ROOT)  # the docs give config paths relative to the repository
    monkeypatch.setenv("V05_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result, (seen[0] if seen else None), Path(args[i + 1])


@pytest.mark.parametrize("doc,cmd", cases(), ids=[f"{d}:{n}" for n, (d, _) in enumerate(cases())])
def test_documented_command_parses_validates_and_stops_before_ray(doc, cmd, v0_ckpt, tmp_path, monkeypatch):
    result, cfg, out = run_cli(cmd, v0_ckpt, tmp_path, monkeypatch)
    assert result.exit_code == 0, f"{doc}: `{cmd}` failed:\n{result.output}"
    assert cfg.trainer.default_local_dir == str(out)
    assert cfg.trainer.resume_mode == ("auto" if "--resume" in cmd else "disable")
    if cfg.algorithm.adv_estimator == "v05":
        assert cfg.v05.v0_checkpoint == str(v0_ckpt)


def test_fresh_run_refuses_a_used_folder_and_resume_continues(v0_ckpt, tmp_path, monkeypatch):
    cmd = next(c for d, c in cases() if d == "docs/cluster.md" and "paper.yaml" in c and "--resume" not in c)
    first, _, out = run_cli(cmd, v0_ckpt, tmp_path, monkeypatch)
    assert first.exit_code == 0
    (out / "global_step_50").mkdir(parents=True)  # what an earlier run leaves behind
    (out / "latest_checkpointed_iteration.txt").write_text("50")

    again, cfg, _ = run_cli(cmd, v0_ckpt, tmp_path, monkeypatch)
    assert again.exit_code == 2 and cfg is None
    assert "not empty" in again.output and "--resume" in again.output and "Traceback" not in again.output

    resumed, cfg, _ = run_cli(cmd + " --resume", v0_ckpt, tmp_path, monkeypatch)
    assert resumed.exit_code == 0 and cfg.trainer.resume_mode == "auto"


def test_missing_v0_checkpoint_fails_in_the_launcher(v0_ckpt, tmp_path, monkeypatch):
    cmd = next(c for d, c in cases() if d == "docs/cluster.md" and "paper.yaml" in c)
    result, cfg, _ = run_cli(cmd.replace(PLACEHOLDER_V0, "/nonexistent/v0.pt"), v0_ckpt, tmp_path, monkeypatch)
    assert result.exit_code == 2 and cfg is None
    assert "/nonexistent/v0.pt" in result.output and "pretrain-v0" in result.output


def test_a_tabpfn_head_without_its_checkpoint_fails_in_the_launcher(tmp_path, monkeypatch):
    """A V0 checkpoint with a TabPFN head whose TabPFN file is gone: refused at launch, naming what to set."""
    from pipelines.cli import main
    import v05_rl.verl.entry as entry

    fake_tabpfn = tmp_path / "tabpfn" / "tabpfn-v2.5-classifier-v2.5_default.ckpt"
    fake_tabpfn.parent.mkdir()
    fake_tabpfn.write_bytes(b"only its path is checked when the head is built")
    monkeypatch.delenv("V05_TABPFN_PATH", raising=False)
    ckpt = tiny_v0_checkpoint(tmp_path / "v0", head={"name": "tabpfn", "tabpfn_path": str(fake_tabpfn)})
    fake_tabpfn.unlink()  # trained elsewhere, or deleted since
    real = entry.launch
    monkeypatch.setattr(entry, "launch", lambda p, o=(), *, dry_run=False: real(p, o, dry_run=True))
    result = CliRunner().invoke(main, ["rl-train", "--engine", "verl", "--config", str(ROOT / "pipelines/configs/paper.yaml"),
                                       "--out", str(tmp_path / "run"), f"v05.v0_checkpoint={ckpt}"])
    assert result.exit_code == 2
    assert "TabPFN" in result.output and "V05_TABPFN_PATH" in result.output
