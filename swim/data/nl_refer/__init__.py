"""NL-Refer construction: raw VideoRefer-700K / VideoRefer-Bench records -> ``<ins>``-tagged natural language.

`raw` reads the released files (streamed) and checks them, `prompt` holds the versioned request contract,
`checks` validates a reply, `build` runs the pipeline (``swim data build``), `synonyms` writes the ``-synonym``
benchmark variant, `local_llm` is an OpenAI-compatible stand-in server for tests and ``make demo-build``.
"""
