"""``torchrun ... -m anchored_megatron.train --config run.yaml key=value ...``"""

from anchored_megatron.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
