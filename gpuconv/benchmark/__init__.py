"""gpuconv.benchmark: the ``gpuconv-bench`` command (see ``cli``) and its parts.

``suites`` (which layers), ``backends`` (what runs them), ``timing`` (how they are timed),
``runner`` (check, then time), ``roofline`` (against what ceiling), ``report`` / ``compare`` /
``plot`` (what comes out). Nothing here needs a GPU to import.
"""


def main(argv=None):
    """The ``gpuconv-bench`` entry point (imports the CLI only when called)."""
    from .cli import main as _main
    return _main(argv)


__all__ = ["main"]
