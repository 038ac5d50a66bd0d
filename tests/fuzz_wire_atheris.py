"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer); run by hand, not part of pytest.

Why next to tests/test_fuzz.py: that test replays a fixed, seeded set of mutations in CI; libFuzzer explores
branches the fixed set never reaches. The property is the same: ``wire.decode`` + ``wire.decode_tensor``
either succeed or raise ``WireError`` with a reason slug; anything else (or a crash) is a finding.

    .venv/bin/pip install atheris
    PYTHONPATH=. .venv/bin/python tests/fuzz_wire_atheris.py /tmp/fedq-corpus -runs=200000 -rss_limit_mb=2048

The corpus directory is seeded with every template of tests/test_fuzz.py (a chunk per codec, lz4 chunks, a
manifest, a commit) when it is empty. Crashing inputs are written by libFuzzer as ``crash-*`` files.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["fedq"]):
    from fedq import wire
    from fedq.errors import WireError


def one_input(data: bytes) -> None:
    """The property: a typed error with a reason, or a valid message whose tensor decodes."""
    try:
        msg = wire.decode(data)
        if msg.kind == wire.CHUNK:
            wire.decode_tensor(msg)
    except WireError as exc:
        if not exc.reason or exc.reason == WireError.reason:
            raise AssertionError(f"WireError without a specific reason: {exc}") from exc


def seed_corpus(directory: Path) -> None:
    """Write the valid templates as seeds, so the fuzzer starts from well-formed messages."""
    from tests.test_fuzz import chunk_templates, control_templates

    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        return
    for t in chunk_templates() + control_templates():
        (directory / hashlib.sha1(t.body).hexdigest()).write_bytes(t.body)


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None:
        seed_corpus(corpus)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
