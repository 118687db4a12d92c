"""Convert a checkpoint: `python tools/convert_hf_to_megatron.py --help` (same as `anchored-convert hf-to-megatron`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anchored_megatron.convert.cli import main  # noqa: E402

if __name__ == "__main__":  # the torch_dist writer re-imports __main__ in worker processes
    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
