"""Convert a checkpoint: `python tools/convert_megatron_to_hf.py --help` (same as `anchored-convert megatron-to-hf`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anchored_megatron.convert.cli import main  # noqa: E402

if __name__ == "__main__":  # the torch_dist writer re-imports __main__ in worker processes
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
