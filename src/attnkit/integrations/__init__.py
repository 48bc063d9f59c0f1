"""Optional integrations with other libraries.

Nothing in attnkit imports these modules; each imports its library only when used, e.g.
``attnkit.integrations.transformers.register()`` for Hugging Face ``transformers``.
"""
