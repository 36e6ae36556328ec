"""The malloc owner: keep_freed_memory (freed activations stay in the process) and
return_freed_memory (large freed buffers go back to the kernel), and the user's own settings win."""

import os
import subprocess
import sys

import pytest

from retinanet import allocator

GLIBC = allocator.uses_glibc()

# Three forward passes of a small conv stack in a fresh process; prints the minor page faults they
# took after a warm-up pass, and whether keep_freed_memory applied (argv[1] == "keep").
PROBE = """
import resource, sys, torch
from retinanet.allocator import keep_freed_memory
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


def _probe(script: str, mode: str, **env) -> tuple[str, int]:
    """Run `script` in a fresh process with argument `mode`: (whether the mode applied, its count)."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    applied, count = out.stdout.split()
    return applied, int(count)


def _faults(mode: str, **env) -> tuple[str, int]:
    return _probe(PROBE, mode, **env)


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


# Allocates and frees 200 MB in 2 MiB blocks after the command line's kept-memory mode, then
# prints how much of it the process still holds (MB), and whether argv[1]'s mode applied.
RETURN_PROBE = """
import sys, torch
from retinanet.allocator import keep_freed_memory, return_freed_memory
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
keep_freed_memory()
applied = return_freed_memory() if sys.argv[1] == "return" else None
before = resident_mb()
blocks = [torch.ones(2**19) for _ in range(100)]
del blocks
print(applied, round(resident_mb() - before))
"""


def _held_after_free(mode: str, **env) -> tuple[str, int]:
    return _probe(RETURN_PROBE, mode, **env)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_return_mode_gives_large_freed_buffers_back_after_the_kept_mode():
    """What a tiled raster pass and the HTTP service switch to: 200 MB of tile-sized buffers
    freed leave the process (kept mode would hold them all)."""
    _, kept = _held_after_free("keep")
    applied, returned = _held_after_free("return")
    assert applied == "True"
    assert kept > 150 and returned < 20, (kept, returned)
    # the user's settings win here too: theirs keep the blocks, and neither mode changes that
    applied, held = _held_after_free("return", MALLOC_MMAP_THRESHOLD_=str(32 << 20),
                                     MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    assert applied == "False" and held > 150, held
