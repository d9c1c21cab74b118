"""Failures keep their substance: bounded detail on the console, everything in --json and build.log."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import MANIFEST, run_cli

BRANCHY = MANIFEST + '\n[modules.branchy]\nfactory = "models.branchy:build"\n' \
    'inputs = [{ name = "x", shape = [{ dim = "b", min = 1, opt = 4, max = 8 }, 4] }]\n' \
    '[targets.branchy_export]\nmodule = "branchy"\nbackend = "exp"\n'


def _failed_target_lines(out: str, name: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"failed   {name}"))
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.startswith("    "):
            break
        block.append(ln)
    return block


def test_weights_mismatch_names_keys_and_shapes(project: Path) -> None:
    import torch

    sd = {"a.weight": torch.zeros(16, 4), "a.bias": torch.zeros(16), "b.weight": torch.zeros(2, 16), "b.bias": torch.zeros(2),
          "c.weight": torch.zeros(1)}
    torch.save(sd, project / "weights/mlp.pt")
    code, out, _ = run_cli(project, "build", "mlp_eager")
    assert code == 2 and "Traceback" not in out
    block = _failed_target_lines(out, "mlp_eager")
    assert "modules.mlp.weights: cannot load weights/mlp.pt" in block[0]
    text = "\n".join(block)
    assert 'Unexpected key(s) in state_dict: "c.weight"' in text, text
    assert "size mismatch for a.weight: copying a param with shape torch.Size([16, 4])" in text, text
    assert len(block) <= 1 + 15 + 1
    reason = json.loads((project / "build/mlp_eager/last-failure.json").read_text())["reason"]  # what --json prints
    assert "size mismatch for a.bias" in reason and "size mismatch for b.weight" in reason, reason
    assert "size mismatch for a.bias" in (project / "build/mlp_eager/build.log").read_text()

    # a whole pickled module instead of a state_dict: torch's explanation of the two options survives
    torch.save(torch.nn.Linear(4, 2), project / "weights/mlp.pt")
    code, out, data = run_cli(project, "build", "mlp_eager", "--json")
    reason = data["targets"][0]["reason"]
    assert reason.count("\n") >= 2 and "weights_only" in reason.split("\n", 1)[1], reason


def test_trace_failure_points_at_the_users_line(project: Path) -> None:
    (project / "models/branchy.py").write_text(
        "import torch\n\n\nclass Branchy(torch.nn.Module):\n    def forward(self, x):\n        if x.sum() > 0:\n"
        "            return x * 2\n        return x - 1\n\n\ndef build():\n    return Branchy()\n")
    (project / "aitune.toml").write_text(BRANCHY)
    code, out, _ = run_cli(project, "build", "branchy_export")
    assert code == 1 and "Traceback" not in out
    block = _failed_target_lines(out, "branchy_export")
    assert "(at models/branchy.py:6)" in block[0] and "(log: " in block[0], block
    assert any("models/branchy.py:6 in forward: if x.sum() > 0:" in ln for ln in block), block
    assert len(block) <= 1 + 15 + 1, block
    failure = json.loads((project / "build/branchy_export/last-failure.json").read_text())
    assert "in your code" in failure["reason"]
    assert "Traceback" in (project / "build/branchy_export/build.log").read_text()
