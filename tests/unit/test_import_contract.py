"""The package boundary: the engine never imports its leaf packages.

`pijax` core, `pijax.model`, `pijax.kernels` and `pijax.serving` are the inference engine.
`pijax.claims` (the synthetic corpus and training), `pijax.bench` and `pijax.workload` are tools
built on top of it; their extra dependencies live in extras (pyproject.toml), so the engine must
import without them. Every engine module is imported in a fresh interpreter, then its
`sys.modules` is checked for the leaves.
"""

import json
import subprocess
import sys

import pijax

LEAVES = ("pijax.claims", "pijax.bench", "pijax.workload")
# Extras of the leaves (flax itself depends on optax, so optax cannot be checked here).
LEAF_DEPENDENCIES = ("matplotlib",)

SCRIPT = """
import importlib, json, pkgutil, sys

import pijax

LEAVES = tuple(sys.argv[1].split(","))


def walk(path, prefix):
    for m in pkgutil.iter_modules(path, prefix):
        if m.name.startswith(LEAVES):
            continue
        yield m.name
        if m.ispkg:
            yield from walk(importlib.import_module(m.name).__path__, m.name + ".")


names = []
# kernels/ and serving/ live outside pijax/ (mapped in pyproject.toml), so each is a root.
for root in ("pijax", "pijax.kernels", "pijax.serving"):
    names += [root, *walk(importlib.import_module(root).__path__, root + ".")]
names = list(dict.fromkeys(names))
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def test_engine_modules_do_not_import_the_leaf_packages():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(LEAVES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    imported = set(got["imported"])
    # The walk reached every engine layer, so an empty walk cannot pass.
    for layer in ("pijax.engine", "pijax.model.llama", "pijax.kernels.dispatch"):
        assert layer in imported, f"{layer} not imported; walked {sorted(imported)}"
    assert "pijax.serving.server" in imported
    assert not imported & set(LEAVES)
    forbidden = [
        m for m in got["loaded"] if m.startswith(LEAVES) or m.split(".")[0] in LEAF_DEPENDENCIES
    ]
    assert not forbidden, f"engine modules import leaf packages: {forbidden}"


def test_leaf_names_exist():
    """The contract names real packages (a rename would make the check above vacuous)."""
    import importlib.util

    for leaf in LEAVES:
        assert importlib.util.find_spec(leaf) is not None, leaf
    assert pijax.__path__
