"""The command proxy: commands forwarded to upstream HTTP services instead of Python handlers (docs/proxy.md).

Declared in a file (``herald serve --config herald.toml``, :mod:`herald.proxy.config`) or on a
:class:`~herald.Domain` (``proxy``, ``proxy_route``). The modules, one concept each:

* :mod:`herald.proxy.spec` — what a proxied command or read route is: URL templates, retry policy (no I/O);
* :mod:`herald.proxy.config` — ``herald.toml`` read into a ``Domain``, every mistake named by line and key;
* :mod:`herald.proxy.binding` — the CloudEvents HTTP binary mode: a request event as headers and body (no I/O);
* :mod:`herald.proxy.outcome` — what an upstream's answer means for the operation (no I/O);
* :mod:`herald.proxy.pool` — connections to upstreams, a concurrency limit per origin;
* :mod:`herald.proxy.forward` — the worker's handler that forwards a command and acts on the answer.

The gateway's side is :mod:`herald.http.callback` (the callback API) and :mod:`herald.http.proxy`
(proxied reads, forwarded cancels). ``import herald`` loads only :mod:`herald.proxy.spec`: httpx is
loaded by the domains that proxy.
"""
