"""Regenerate the committed Python stubs of `pijax/v1/inference.proto`.

    python -m pijax.serving.proto.generate          # rewrite the stubs in place
    python -m pijax.serving.proto.generate --check  # exit 1 if they differ from the proto

The stubs are committed (an editable install needs no build step), and
`tests/serving/test_proto_stubs.py` runs `generate_stubs()` into a temporary folder and compares,
so the proto and its stubs cannot drift. `grpcio-tools` is pinned in the `dev` extra because its
version is written into the generated code.

protoc names the generated imports after the proto's path (`pijax.v1`), which would shadow the
`pijax` package; the one import the gRPC stub makes is rewritten to the installed location.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("pijax/v1/inference.proto",)
PACKAGE = "pijax.serving.proto"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate_stubs(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) into `out_dir`; returns the generated files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
    files = []
    for rel in PROTO_FILES:
        stem = rel.removesuffix(".proto")
        for suffix in STUB_SUFFIXES:
            path = out_dir / f"{stem}{suffix}"
            _fix_imports(path, stem.rsplit("/", 1)[0].replace("/", "."))
            files.append(path)
    return files


def _fix_imports(path: Path, proto_package: str) -> None:
    text = path.read_text()
    text = text.replace(f"from {proto_package} import ", f"from {PACKAGE}.{proto_package} import ")
    path.write_text(text)


def stale_stubs() -> list[str]:
    """Stub files (relative to the proto root) whose committed text differs from protoc's."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate_stubs(Path(tmp)):
            rel = fresh.relative_to(tmp)
            committed = PROTO_ROOT / rel
            if not committed.is_file() or committed.read_text() != fresh.read_text():
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for rel in stale:
            print(f"stale: {rel} (run python -m {PACKAGE}.generate)")
        return 1 if stale else 0
    for path in generate_stubs(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
