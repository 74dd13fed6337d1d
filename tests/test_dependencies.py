"""The library works with only its declared runtime dependencies (pyproject `dependencies`, as installed) importable.

A subprocess runs without site-packages (`python -S`), on a path that links in only the distributions those
dependencies bring in (transitively) and lora_lite itself, then runs every variant through attach, train step, save, load, merge,
disabled, scaled, export_peft and detach. A new import of an undeclared package (numpy through
safetensors.torch was one, transformers would be another) fails here, not on a user's minimal install.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import tempfile, os, torch
from torch import nn
import lora_lite as ll

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
    def forward(self, x):
        return self.down(torch.relu(self.up(x)))

def fresh():
    torch.manual_seed(0)
    return Net()

x = torch.randn(64, 16)
tmp = tempfile.mkdtemp()
for v in sorted(ll.REGISTRY):
    m, ref = fresh(), fresh()
    kw = {"group_size": 8} if v == "road" else {}  # peft's default group_size 64 divides no out_features here
    cfg = ll.LoraLiteConfig(variant=v, r=4, target_roles=("reader", "writer", "inner"), variant_kwargs=kw)
    ll.attach(m, cfg, calibration_data=[x] if v == "eva" else None)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        y = m(x)
        with ll.disabled(m):
            assert torch.equal(m(x), ref(x)), v
        with ll.scaled(m, 0.5):
            m(x)
    path = os.path.join(tmp, v + ".safetensors")
    ll.save(m, path)
    m2 = fresh()
    ll.load(m2, path)
    with torch.no_grad():
        assert torch.equal(m2(x), y), v
    if v in ("lora", "pissa", "dora"):
        ll.export_peft(m2, os.path.join(tmp, v + "_peft"))
    ll.merge(m2)
    ll.detach(m)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values())), v
    print(v, "ok")
"""


def _canonical(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503: runs of -, _ and . become -, lower case)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str] | None) -> list[str]:
    """Distribution names of the unconditional requirements (markers that name an extra are left out)."""
    return [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in reqs or () if "extra ==" not in r]


def _declared_closure() -> set[str]:
    todo = _requirement_names(metadata.requires("lora-lite"))  # the installed metadata: what pip gives a user
    seen: set[str] = set()
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirement_names(metadata.requires(name))
        except metadata.PackageNotFoundError:
            pass
    return seen


def _link_distributions(names: set[str], into: Path) -> None:
    """Symlink the top-level files and folders of the installed distributions `names` into `into`."""
    for dist in metadata.distributions():
        if _canonical(dist.metadata["Name"]) not in names:
            continue
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}:
            src, dst = Path(dist.locate_file(top)), into / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


def test_core_api_needs_only_declared_dependencies(tmp_path: Path) -> None:
    allowed = _declared_closure()
    assert {"torch", "safetensors", "numpy"} <= allowed, allowed  # numpy: safetensors.torch imports it
    _link_distributions(allowed, tmp_path)
    (tmp_path / "lora_lite").symlink_to(ROOT / "src" / "lora_lite")
    proc = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import lora_lite as ll

    assert proc.stdout.split() == [w for v in sorted(ll.REGISTRY) for w in (v, "ok")], proc.stdout
