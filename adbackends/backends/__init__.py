"""The built-in backends: ``torch.func``, ``functorch`` and ``loop``.

Each lives in a module of its own and imports its machinery only in
:meth:`~adbackends.Backend.load`, so importing this package is cheap.
"""
