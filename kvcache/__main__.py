"""``python -m kvcache``: the ``kvcache`` command (see kvcache.cli)."""
if __name__ == "__main__":
    from kvcache.cli import main

    raise SystemExit(main())
