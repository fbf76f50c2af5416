"""Data shipped with the package: a small English corpus for the demo (``python -m tensorlink.demo``).

``pipeline_story.txt`` is original prose written for this project (an explanation of how decentralized
pipeline training works), plain ASCII, so a byte-level model can learn it in a couple of minutes.
"""

from __future__ import annotations

from importlib import resources

CORPUS = "pipeline_story.txt"


def corpus_text(name: str = CORPUS) -> str:
    """The text of a corpus file shipped in this package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


__all__ = ["CORPUS", "corpus_text"]
