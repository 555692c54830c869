"""`accelerate launch -m train --config configs/default.yaml [key=value ...]`: same as `mambaspin train`."""

import sys

from mambaspin.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
