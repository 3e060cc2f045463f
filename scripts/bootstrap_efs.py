#!/usr/bin/env python3
"""Put a model on EFS (first time or refresh): the same as ``sd-lambda seed``.

    scripts/bootstrap_efs.py --model segmind/tiny-sd
    scripts/bootstrap_efs.py --from-dir ./my-pipeline --name my-model

The logic lives in ``sd_lambda.seeding``; ``--help`` lists every flag.
"""

import sys

from sd_lambda.cli import main

if __name__ == "__main__":
    sys.exit(main(["seed", *sys.argv[1:]]))
