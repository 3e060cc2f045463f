"""Loaded by ``site`` at start-up when this folder is on PYTHONPATH: records, as JSON lines in the file
``SD_LAMBDA_TEST_IMPORT_LOG`` names, every attempt of the process to import a module of the torch stack,
with the frames that asked for it. An attempt is recorded even where the module is absent or the caller
swallows the ImportError, so a test can prove the OpenVINO image's code never reaches for torch.
Standard library only: it runs inside the image venv's interpreter.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

WATCHED = ("torch", "diffusers", "transformers", "safetensors")
LOG = os.environ["SD_LAMBDA_TEST_IMPORT_LOG"]


class TorchStackWatch:
    """A meta path finder that finds nothing: it only writes down who asked for a watched module."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in WATCHED:
            frames = [
                f"{frame.filename}:{frame.lineno} ({frame.line})"
                for frame in traceback.extract_stack()[:-1]
                if not frame.filename.startswith("<frozen") and frame.filename != __file__
            ]
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps({"module": name, "stack": frames[-4:]}) + "\n")
        return None


sys.meta_path.insert(0, TorchStackWatch())
