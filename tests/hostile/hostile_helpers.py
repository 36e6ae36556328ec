"""What the hostile tests share: running a command that must refuse in one line."""

from retinanet.cli import main as cli


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line (no traceback) holding each of
    `expected`; returns that line."""
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
