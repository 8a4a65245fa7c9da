"""Machinery the editing methods share: the architecture table (``targets``), tracing and editing
modules' inputs and outputs (``hooks``), language-model helpers (``lm``), frozen-prefix passes
(``prefix``), key statistics and their corpus (``stats``, ``corpus``), FFN patches (``patch``),
what learned editors share (``learned``), built-in counterfactual facts (``facts``) and provenance.

Nothing here registers an editor or imports a method package (``tests/test_layout.py`` checks it).
"""
