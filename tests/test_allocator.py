"""keep_freed_memory: freed activations stay in the process instead of returning to the kernel."""

import os
import subprocess
import sys

import pytest

from retinanet.engine import allocator

GLIBC = allocator.uses_glibc()

# Three forward passes of a small conv stack in a fresh process; prints the minor page faults they
# took after a warm-up pass, and whether keep_freed_memory applied (argv[1] == "keep").
PROBE = """
import resource, sys, torch
from retinanet.engine.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "cli":
    import os
    from retinanet.cli import main
    main(["plot", os.environ["PROBE_RUN_DIR"], "--output", os.environ["PROBE_RUN_DIR"] + "/c.png"])
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
def forward():
    x = torch.randn(2, 64, 128, 128)
    with torch.no_grad():
        for _ in range(4):
            x = torch.relu(conv(x)) + x
torch.set_num_threads(1)
forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    forward()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_activations_are_reused_without_page_faults():
    _, as_is = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    # 8 MB activations: as is, each pass faults them in afresh (~50,000 faults); kept, ~2,000
    assert kept * 5 < as_is, (kept, as_is)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_users_own_malloc_settings_win():
    applied, _ = _faults("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert applied == "False"
    applied, _ = _faults("keep", MALLOC_MMAP_THRESHOLD_="65536")
    assert applied == "False"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_command_line_applies_it(tmp_path):
    """A command run through `retinanet.cli.main` (here one that stops at its argument check)
    leaves the process with the kept-memory settings: the same passes fault far less after it."""
    (tmp_path / "run").mkdir()
    _, as_is = _faults("default")
    applied, after_cli = _faults("cli", PROBE_RUN_DIR=str(tmp_path / "run"))
    assert applied == "None" and after_cli * 5 < as_is, (after_cli, as_is)
