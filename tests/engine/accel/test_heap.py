"""glibc heap controls: what each does to this process's resident anonymous memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sd_lambda.devtools.bench_worker import status_bytes
from sd_lambda.engine.accel import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc's malloc only")

MB = 1 << 20

# Run in a child: keep_freed_memory changes the allocator for the rest of a process's life.
_FREE_ONE_BIG_BLOCK = textwrap.dedent(
    """
    import sys
    from sd_lambda.engine.accel import heap
    from sd_lambda.devtools.bench_worker import status_bytes

    if sys.argv[1] == "keep":
        assert heap.keep_freed_memory()
    block = b"x" * (256 << 20)
    held = status_bytes("RssAnon")
    del block
    print(held - status_bytes("RssAnon"))
    """
)


def rss_anon_bytes() -> int:
    anonymous = status_bytes("RssAnon")
    assert anonymous is not None, "no RssAnon in /proc/self/status"
    return anonymous


def released_on_free(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _FREE_ONE_BIG_BLOCK, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout.strip())


def test_keep_freed_memory_keeps_a_freed_block_resident() -> None:
    assert released_on_free("default") > 200 * MB  # a 256 MB block is its own mapping, unmapped on free
    assert released_on_free("keep") < 16 * MB


def test_return_freed_memory_releases_free_heap_pages() -> None:
    # 64 KiB blocks sit under glibc's mmap threshold, so they come from the heap; the block allocated
    # after them pins the heap's top, so freeing them leaves free pages below it that glibc keeps.
    blocks = [b"x" * (64 << 10) for _ in range(3000)]
    pin = b"y" * (64 << 10)
    del blocks
    before = rss_anon_bytes()
    assert heap.return_freed_memory()
    assert before - rss_anon_bytes() > 100 * MB
    assert pin
