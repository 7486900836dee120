"""htmx through htmx-flask: the extension, the request test, and the response headers.

``Htmx(app)`` (in ``create_app``) makes every request an htmx-aware one:
``request.htmx`` is true when htmx sent it (``HX-Request: true``), and a
view answers with the ``_partial`` htmx swaps in. :func:`make_response` is
Flask's, plus the htmx response headers as keywords (``redirect=`` for
``HX-Redirect``, ``trigger=`` for ``HX-Trigger``...).

htmx-flask ships no type information (no ``py.typed``), so mypy sees the
package as ``Any``. This is the one module that imports it: views import
``request`` and :func:`make_response` from here, typed.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import htmx_flask  # type: ignore[import-untyped]  # ships no py.typed: typed below
from flask import Request, Response

__all__ = ["Htmx", "HtmxHeaders", "HtmxRequest", "make_response", "request"]

#: htmx-flask's extension: ``Htmx(app)`` installs its request class on ``app``.
Htmx = htmx_flask.Htmx


class HtmxHeaders(Protocol):
    """``request.htmx``: true for a request htmx sent (htmx-flask's ``HtmxHeaders``)."""

    def __bool__(self) -> bool: ...


class HtmxRequest(Request):
    """Flask's request as htmx-flask's request class makes it (for the type checker)."""

    htmx: HtmxHeaders


#: Flask's ``request``, typed as htmx-flask's request (``Htmx(app)`` makes it one).
request = cast(HtmxRequest, htmx_flask.request)


def make_response(*args: Any, **htmx_headers: Any) -> Response:
    """``flask.make_response(*args)`` with htmx response headers, e.g. ``redirect=`` sets
    ``HX-Redirect`` (see ``htmx_flask.make_response`` for the keywords)."""
    response: Response = htmx_flask.make_response(*args, **htmx_headers)
    return response
