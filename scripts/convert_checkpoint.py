"""Convert a checkpoint (HF directory, or a preset) into a native orbax checkpoint.

    python scripts/convert_checkpoint.py --input path/to/hf_dir --output path/to/native \
        --dtype bfloat16

The output directory holds the orbax params, `config.json`, `generation_config.json`, the
tokenizer files and the marker `pijax_checkpoint.json`; `pijax.model.loader.load_model` (and so
`pijax.LLM`) reads it like any other source, restoring each shard directly onto its device.
Conversion runs on the host CPU.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from pijax.model.loader import convert_checkpoint

_INPUT = flags.DEFINE_string("input", None, "HF checkpoint directory (or preset name) to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the native checkpoint into.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "Dtype the parameters are stored in."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing native checkpoint at --output."
)
flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        out = convert_checkpoint(
            _INPUT.value, _OUTPUT.value, _DTYPE.value, overwrite=_OVERWRITE.value
        )
    except ValueError as e:  # CheckpointError / ConfigError: the message names the file and field
        sys.exit(f"convert_checkpoint: error: {e}")
    logging.info("wrote native checkpoint to %s", out)
    print(out)


if __name__ == "__main__":
    app.run(main)
