"""Model compression on the public training API: :mod:`.distill`, :mod:`.prune`, :mod:`.quantize`, and what they
share (:mod:`.common`: loading a trained run, the commands' parser, a plain accuracy loop)."""

__all__: list[str] = []
