"""The documentation as a product: an offline HTML site and a PDF book, generated from the declarations.

``chainrule docs`` (``site.build_site``) writes a page per built-in model, layer, loss and optimiser,
the concepts guide and an index; ``chainrule docs MODEL`` adds a page for a user's model; ``--pdf``
typesets the same content with pdflatex (``book.py``). It sits above runtime, codegen and derive:
it only reads what they derive and generate.
"""
from .site import build_site, build_user_pages, model_page

__all__ = ["build_site", "build_user_pages", "model_page"]
